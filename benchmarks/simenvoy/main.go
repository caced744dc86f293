// Command simenvoy is the load benchmark's simulated Envoys in Go: many ADS streams (SotW or
// delta) in one process that subscribe, follow names and ACK as Envoy does, driven over
// stdin/stdout by the Python coordinator (benchmarks/goworker.py), one JSON line per command
// and per reply.
//
// Why Go: the Python simulated Envoys (benchmarks/client.py) spend about 0.6 ms of CPU per
// 0.57 MB route configuration in grpcio's read path, 1.2-1.6 s per mission-scale route change,
// on the same two cores pilot runs on. That floor, not pilot, set the route-change p99. Envoy
// reads xDS in C++; this client reads it in compiled Go at a fraction of that cost, so the
// benchmark measures the control plane rather than its load generator.
//
// Behaviour mirrors benchmarks/client.py: CDS and LDS are requested on connect, EDS for every
// EDS cluster's service name and RDS for every route name the listeners use; every response is
// ACKed (SotW repeats the subscribed names, delta sends the nonce alone); a failed stream is
// reopened after Envoy's jittered exponential backoff with its state reset. Clients are ready
// once CDS and LDS are ACKed and every subscribed EDS and RDS name was received. Timestamps
// are CLOCK_MONOTONIC seconds, the clock Python's time.monotonic reads, so the coordinator
// compares them with its own.
//
// Commands (field "cmd"): connect {target, delta, nodes: base64 serialized Node messages,
// record, streams_per_connection}, status, arm {kind, type_url, needles: base64}, results,
// recorded, recorded_changes, disconnect, close.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

const (
	typePrefix = "type.googleapis.com/envoy."
	clusterT   = typePrefix + "config.cluster.v3.Cluster"
	listenerT  = typePrefix + "config.listener.v3.Listener"
	endpointT  = typePrefix + "config.endpoint.v3.ClusterLoadAssignment"
	routeT     = typePrefix + "config.route.v3.RouteConfiguration"
	vhostT     = typePrefix + "config.route.v3.VirtualHost" // VHDS: delta only, as Envoy
	hcmT       = typePrefix + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

	service     = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
	sotwMethod  = service + "StreamAggregatedResources"
	deltaMethod = service + "DeltaAggregatedResources"

	retryBase  = 0.5             // Envoy's ADS backoff: jittered exponential from 500 ms,
	retryMax   = 30.0            // capped at 30 s
	near       = 2048            // how far from the first needle the others are looked for first (bytes)
	window     = 256 << 20       // Envoy's default HTTP/2 stream and connection windows (256 MiB)
	closeGrace = 5 * time.Second // how long a disconnect lets the server end half-closed streams
)

// dependent: the type whose names a response of this type tells the client to request.
var dependent = map[string]string{clusterT: endpointT, listenerT: routeT}

func monotonic() float64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

// rawCodec sends protobuf messages and receives each response as its bytes, in a buffer of
// gRPC's pool that the reader frees once done: the client decodes only what it needs, and the
// expectation searches the bytes as received.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	b, err := proto.Marshal(v.(proto.Message))
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*(v.(*mem.Buffer)) = data.MaterializeToBuffer(mem.DefaultBufferPool())
	return nil
}

func (rawCodec) Name() string { return "proto" }

// subscription is one set of names and its sorted list, shared by every client asking for it.
type subscription struct {
	set    map[string]struct{}
	sorted []string
}

var emptySub = &subscription{set: map[string]struct{}{}}

// decoded is what clients take from one response's resources, shared by all that get it.
type decoded struct {
	names  []string
	refs   map[string][]string // CDS/LDS: resource name -> names of the dependent type it uses
	wanted *subscription       // CDS/LDS: the union of refs
}

// cache memoises decoding per distinct resource and response, and interns subscriptions:
// clients of one class get the same bytes (a 1 MB CDS response of 3,000 clusters at 1,000
// services), decoded once per process instead of once per client.
type cache struct {
	mu        sync.Mutex
	seed      maphash.Seed
	refs      map[string][]string
	responses map[string]*decoded
	subs      map[string]*subscription
}

func newCache() *cache {
	return &cache{seed: maphash.MakeSeed(), refs: map[string][]string{},
		responses: map[string]*decoded{}, subs: map[string]*subscription{}}
}

func (c *cache) subscription(names map[string]struct{}) *subscription {
	if len(names) == 0 {
		return emptySub
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	slices.Sort(sorted)
	key := strings.Join(sorted, "\x00")
	c.mu.Lock()
	defer c.mu.Unlock()
	if found, ok := c.subs[key]; ok {
		return found
	}
	s := &subscription{set: names, sorted: sorted}
	c.subs[key] = s
	return s
}

// resourceRefs: the dependent names one CDS or LDS resource refers to.
func (c *cache) resourceRefs(typeURL string, value []byte) []string {
	c.mu.Lock()
	found, ok := c.refs[string(value)]
	c.mu.Unlock()
	if ok {
		return found
	}
	var out []string
	switch typeURL {
	case clusterT:
		cl := &clusterv3.Cluster{}
		if proto.Unmarshal(value, cl) == nil && cl.GetClusterDiscoveryType() != nil &&
			cl.GetType() == clusterv3.Cluster_EDS {
			name := cl.GetEdsClusterConfig().GetServiceName()
			if name == "" {
				name = cl.GetName()
			}
			out = []string{name}
		}
	case listenerT:
		l := &listenerv3.Listener{}
		if proto.Unmarshal(value, l) == nil {
			chains := l.GetFilterChains()
			if l.GetDefaultFilterChain() != nil {
				chains = append(slices.Clip(chains), l.GetDefaultFilterChain())
			}
			for _, chain := range chains {
				for _, f := range chain.GetFilters() {
					if f.GetTypedConfig().GetTypeUrl() != hcmT {
						continue
					}
					h := &hcmv3.HttpConnectionManager{}
					if proto.Unmarshal(f.GetTypedConfig().GetValue(), h) == nil && h.GetRds() != nil {
						out = append(out, h.GetRds().GetRouteConfigName())
					}
				}
			}
		}
	}
	c.mu.Lock()
	c.refs[string(value)] = out
	c.mu.Unlock()
	return out
}

// firstString: field 1 of a serialized message when it is a string (every xDS resource's name).
func firstString(b []byte) string {
	if len(b) == 0 || b[0] != 0x0A {
		return ""
	}
	var length, shift uint
	i := 1
	for i < len(b) {
		c := b[i]
		i++
		length |= uint(c&0x7F) << shift
		if c < 0x80 {
			break
		}
		shift += 7
	}
	if i+int(length) > len(b) {
		return ""
	}
	return string(b[i : i+int(length)])
}

type item struct {
	name  string
	value []byte
}

// response decodes the resources of one response; CDS and LDS ones are memoised by their
// bytes (hashed: keeping megabytes of keys per distinct response is not needed).
func (c *cache) response(typeURL string, items []item) *decoded {
	dep := dependent[typeURL] != ""
	if !dep {
		names := make([]string, len(items))
		for i, it := range items {
			names[i] = it.name
		}
		return &decoded{names: names, wanted: emptySub}
	}
	var h maphash.Hash
	h.SetSeed(c.seed)
	h.WriteString(typeURL)
	for _, it := range items {
		h.WriteString(it.name)
		h.Write(it.value)
	}
	key := fmt.Sprintf("%d/%d", len(items), h.Sum64())
	c.mu.Lock()
	found, ok := c.responses[key]
	c.mu.Unlock()
	if ok {
		return found
	}
	d := &decoded{names: make([]string, len(items)), refs: make(map[string][]string, len(items))}
	union := map[string]struct{}{}
	for i, it := range items {
		d.names[i] = it.name
		refs := c.resourceRefs(typeURL, it.value)
		d.refs[it.name] = refs
		for _, r := range refs {
			union[r] = struct{}{}
		}
	}
	d.wanted = c.subscription(union)
	c.mu.Lock()
	c.responses[key] = d
	c.mu.Unlock()
	return d
}

type expectation struct {
	Kind    string   `json:"kind"`
	TypeURL string   `json:"type_url"`
	Needles [][]byte `json:"needles"`
}

// matches: every needle occurs in raw; the others are looked for near the first one first (a
// route's weighted clusters are adjacent), so a 0.6 MB response is scanned about once.
func (e *expectation) matches(raw []byte) bool {
	if len(e.Needles) == 0 {
		return false
	}
	at := bytes.Index(raw, e.Needles[0])
	if at < 0 {
		return false
	}
	around := raw[max(0, at-near):min(len(raw), at+near)]
	for _, n := range e.Needles[1:] {
		if !bytes.Contains(around, n) && !bytes.Contains(raw, n) {
			return false
		}
	}
	return true
}

type typeState struct {
	version, nonce string
	acked          bool
	subscribed     *subscription
	received       map[string]struct{} // EDS/RDS names held; dropped once the client is ready
	refs           map[string][]string // delta CDS/LDS: resource -> names used
	sharedRefs     bool                // refs is a cached response's map: copy before changing
}

type result struct {
	ReadyAt    *float64 `json:"ready_at"`
	MatchedAt  *float64 `json:"matched_at"`
	Responses  int      `json:"responses"`
	Reconnects int      `json:"reconnects"`
	Error      string   `json:"error"`
}

type recordedResponse struct {
	TypeURL string
	Raw     []byte
}

type client struct {
	node  *corev3.Node
	delta bool
	cache *cache

	mu       sync.Mutex // guards everything below against the command loop
	res      result
	exp      *expectation
	record   bool
	initial  []recordedResponse
	changes  map[string][]byte
	stream   grpc.ClientStream
	closing  bool
	types    map[string]*typeState
	sentNode bool
	sendMu   sync.Mutex // SendMsg and CloseSend must not run at once
}

func newClient(node *corev3.Node, delta bool, c *cache, record bool) *client {
	cl := &client{node: node, delta: delta, cache: c, record: record, changes: map[string][]byte{}}
	cl.reset()
	return cl
}

func (c *client) reset() {
	c.types = map[string]*typeState{}
	for _, t := range []string{clusterT, endpointT, listenerT, routeT, vhostT} {
		c.types[t] = &typeState{subscribed: emptySub, received: map[string]struct{}{}}
	}
	c.sentNode = false
	if c.exp == nil {
		c.initial = nil
	}
}

func (c *client) run(ctx context.Context, conn *grpc.ClientConn, done *sync.WaitGroup) {
	defer done.Done()
	attempt := 0
	for {
		got := c.runStream(ctx, conn)
		c.mu.Lock()
		closing := c.closing
		if !closing {
			c.res.Reconnects++
		}
		c.mu.Unlock()
		if closing || ctx.Err() != nil {
			return
		}
		if got {
			attempt = 1
		} else {
			attempt++
		}
		wait := rand.Float64() * min(retryMax, retryBase*float64(int(1)<<min(attempt-1, 20)))
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(wait * float64(time.Second))):
		}
		c.mu.Lock()
		c.reset()
		c.mu.Unlock()
	}
}

func (c *client) send(s grpc.ClientStream, msgs []proto.Message) error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	for _, m := range msgs {
		if err := s.SendMsg(m); err != nil {
			return err
		}
	}
	return nil
}

// runStream runs one ADS stream until it ends; records why, returns whether it got a response.
func (c *client) runStream(ctx context.Context, conn *grpc.ClientConn) bool {
	method := sotwMethod
	if c.delta {
		method = deltaMethod
	}
	desc := &grpc.StreamDesc{StreamName: method, ServerStreams: true, ClientStreams: true}
	s, err := conn.NewStream(ctx, desc, method, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		c.fail(err)
		return false
	}
	c.mu.Lock()
	c.stream = s
	first := []proto.Message{c.request(clusterT, "", "", nil), c.request(listenerT, "", "", nil)}
	c.mu.Unlock()
	if err := c.send(s, first); err != nil {
		c.fail(err)
		return false
	}
	got := false
	for {
		var buf mem.Buffer
		if err := s.RecvMsg(&buf); err != nil {
			if errors.Is(err, io.EOF) {
				c.fail(errors.New("stream ended by server"))
			} else {
				c.fail(err)
			}
			return got
		}
		got = true
		err := c.onResponse(s, buf.ReadOnlyData())
		buf.Free() // nothing keeps the bytes: names are copied, a recorded response too
		if err != nil {
			c.fail(err)
			return got
		}
	}
}

func (c *client) fail(err error) {
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = fmt.Sprintf("%s: %s", strings.ToUpper(st.Code().String()), st.Message())
	}
	c.mu.Lock()
	c.res.Error = msg
	c.mu.Unlock()
}

func (c *client) onResponse(s grpc.ClientStream, raw []byte) error {
	c.mu.Lock()
	c.res.Responses++
	var typeURL string
	var reqs []proto.Message
	var err error
	if c.delta {
		typeURL, reqs, err = c.deltaResponse(raw)
	} else {
		typeURL, reqs, err = c.sotwResponse(raw)
	}
	c.mu.Unlock()
	if err != nil {
		return err
	}
	if err := c.send(s, reqs); err != nil {
		return err
	}
	now := monotonic()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.record && c.exp == nil {
		c.initial = append(c.initial, recordedResponse{typeURL, bytes.Clone(raw)})
	}
	if c.res.ReadyAt == nil && c.complete() {
		c.res.ReadyAt = &now
		for _, t := range []string{endpointT, routeT} {
			c.types[t].received = nil // only readiness needs it
		}
	}
	// A route change reaches a VHDS client as the virtual hosts it changed.
	expected := c.exp != nil && (typeURL == c.exp.TypeURL || typeURL == vhostT && c.exp.TypeURL == routeT)
	if e := c.exp; expected && c.res.MatchedAt == nil && e.matches(raw) {
		c.res.MatchedAt = &now
		if c.record {
			c.changes[e.Kind] = bytes.Clone(raw)
		}
	}
	return nil
}

func (c *client) complete() bool {
	t := c.types
	vhds := t[vhostT]
	return t[clusterT].acked && t[listenerT].acked && covers(t[endpointT]) && covers(t[routeT]) &&
		(vhds.subscribed != vhdsSub || vhds.acked)
}

// vhdsSub marks a client subscribed to VHDS: Envoy subscribes with no names (a wildcard).
var vhdsSub = &subscription{set: map[string]struct{}{}}

// namesVHDS: whether a serialized RouteConfiguration names a VHDS source (field 9, vhds).
func namesVHDS(value []byte) bool {
	found := false
	_ = fields(value, func(num protowire.Number, _ []byte) {
		if num == fRouteVhds {
			found = true
		}
	})
	return found
}

func covers(t *typeState) bool {
	for n := range t.subscribed.set {
		if _, ok := t.received[n]; !ok {
			return false
		}
	}
	return true
}

func (t *typeState) receive(names []string) {
	if t.received == nil {
		return
	}
	for _, n := range names {
		t.received[n] = struct{}{}
	}
}

func (t *typeState) subscribe(s *subscription) {
	t.subscribed = s
	for n := range t.received {
		if _, ok := s.set[n]; !ok {
			delete(t.received, n)
		}
	}
}

func (c *client) request(typeURL, version, nonce string, names []string) proto.Message {
	var node *corev3.Node
	if !c.sentNode {
		node = c.node
		c.sentNode = true
	}
	if c.delta {
		return &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typeURL, ResponseNonce: nonce,
			ResourceNamesSubscribe: names}
	}
	return &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typeURL, VersionInfo: version,
		ResponseNonce: nonce, ResourceNames: names}
}

// received decodes a response and finds the client's state for its type.
func (c *client) received(raw []byte, delta bool) (*response, *typeState, error) {
	resp, err := parseResponse(raw, delta)
	if err != nil {
		return nil, nil, err
	}
	state, ok := c.types[resp.typeURL]
	if !ok {
		return nil, nil, fmt.Errorf("response of unknown type %q", resp.typeURL)
	}
	return resp, state, nil
}

func (c *client) sotwResponse(raw []byte) (string, []proto.Message, error) {
	resp, state, err := c.received(raw, false)
	if err != nil {
		return "", nil, err
	}
	typeURL := resp.typeURL
	state.version, state.nonce, state.acked = resp.version, resp.nonce, true
	d := c.cache.response(typeURL, resp.items)
	reqs := []proto.Message{c.request(typeURL, state.version, state.nonce, state.subscribed.sorted)}
	depT := dependent[typeURL]
	if depT == "" {
		state.receive(d.names)
		return typeURL, reqs, nil
	}
	dep := c.types[depT]
	if d.wanted != dep.subscribed {
		dep.subscribe(d.wanted)
		reqs = append(reqs, c.request(depT, dep.version, dep.nonce, dep.subscribed.sorted))
	}
	return typeURL, reqs, nil
}

func (c *client) deltaResponse(raw []byte) (string, []proto.Message, error) {
	resp, state, err := c.received(raw, true)
	if err != nil {
		return "", nil, err
	}
	typeURL := resp.typeURL
	state.nonce, state.acked = resp.nonce, true
	reqs := []proto.Message{c.request(typeURL, "", state.nonce, nil)}
	d := c.cache.response(typeURL, resp.items)
	depT := dependent[typeURL]
	if depT == "" {
		state.receive(d.names)
		if state.received != nil {
			for _, n := range resp.removed {
				delete(state.received, n)
			}
		}
		// As Envoy: a route configuration naming VHDS makes the stream subscribe to virtual hosts.
		if vh := c.types[vhostT]; typeURL == routeT && vh.subscribed != vhdsSub {
			for _, it := range resp.items {
				if namesVHDS(it.value) {
					vh.subscribed = vhdsSub
					reqs = append(reqs, &discoveryv3.DeltaDiscoveryRequest{TypeUrl: vhostT})
					break
				}
			}
		}
		return typeURL, reqs, nil
	}
	dep := c.types[depT]
	var wanted *subscription
	if state.refs == nil && len(resp.removed) == 0 {
		state.refs, state.sharedRefs, wanted = d.refs, true, d.wanted // every connect: shared as is
	} else {
		if state.sharedRefs || state.refs == nil {
			refs := make(map[string][]string, len(state.refs)+len(d.refs))
			for k, v := range state.refs {
				refs[k] = v
			}
			state.refs, state.sharedRefs = refs, false
		}
		for k, v := range d.refs {
			state.refs[k] = v
		}
		for _, n := range resp.removed {
			delete(state.refs, n)
		}
		union := map[string]struct{}{}
		for _, names := range state.refs {
			for _, n := range names {
				union[n] = struct{}{}
			}
		}
		wanted = c.cache.subscription(union)
	}
	if wanted != dep.subscribed {
		var subscribe, unsubscribe []string
		if len(dep.subscribed.set) == 0 {
			subscribe = wanted.sorted
		} else {
			for _, n := range wanted.sorted {
				if _, ok := dep.subscribed.set[n]; !ok {
					subscribe = append(subscribe, n)
				}
			}
			for _, n := range dep.subscribed.sorted {
				if _, ok := wanted.set[n]; !ok {
					unsubscribe = append(unsubscribe, n)
				}
			}
		}
		reqs = append(reqs, &discoveryv3.DeltaDiscoveryRequest{TypeUrl: depT,
			ResourceNamesSubscribe: subscribe, ResourceNamesUnsubscribe: unsubscribe})
		dep.subscribe(wanted)
	}
	return typeURL, reqs, nil
}

// fleet: the clients of one connect command and what they run on.
type fleet struct {
	clients []*client
	conns   []*grpc.ClientConn
	cancel  context.CancelFunc
	done    sync.WaitGroup
}

type command struct {
	Cmd    string   `json:"cmd"`
	Target string   `json:"target"`
	Delta  bool     `json:"delta"`
	Nodes  [][]byte `json:"nodes"`
	Record bool     `json:"record"`
	// Streams per TCP connection: 1 (or unset) as Envoy, whose ADS stream has its connection.
	PerConn int          `json:"streams_per_connection"`
	Expect  *expectation `json:"expectation"`
}

type worker struct {
	cache *cache
	fleet *fleet
}

func (w *worker) connect(cmd *command) (any, error) {
	if w.fleet != nil {
		return nil, errors.New("already connected: disconnect first")
	}
	f := &fleet{}
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	perConn := max(1, cmd.PerConn)
	count := (len(cmd.Nodes) + perConn - 1) / perConn
	for range max(1, count) {
		conn, err := grpc.NewClient("passthrough:///"+cmd.Target,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)),
			grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window))
		if err != nil {
			cancel()
			return nil, err
		}
		f.conns = append(f.conns, conn)
	}
	for i, raw := range cmd.Nodes {
		node := &corev3.Node{}
		if err := proto.Unmarshal(raw, node); err != nil {
			cancel()
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
		f.clients = append(f.clients, newClient(node, cmd.Delta, w.cache, cmd.Record && i == 0))
	}
	for i, cl := range f.clients {
		f.done.Add(1)
		go cl.run(ctx, f.conns[i%len(f.conns)], &f.done)
	}
	w.fleet = f
	return len(f.clients), nil
}

func (w *worker) status() any {
	out := map[string]any{"clients": 0, "ready": 0, "matched": 0, "reconnects": 0, "first_error": ""}
	if w.fleet == nil {
		return out
	}
	ready, matched, reconnects, firstError := 0, 0, 0, ""
	for _, c := range w.fleet.clients {
		c.mu.Lock()
		if c.res.ReadyAt != nil {
			ready++
		}
		if c.res.MatchedAt != nil {
			matched++
		}
		reconnects += c.res.Reconnects
		if firstError == "" {
			firstError = c.res.Error
		}
		c.mu.Unlock()
	}
	out["clients"], out["ready"], out["matched"] = len(w.fleet.clients), ready, matched
	out["reconnects"], out["first_error"] = reconnects, firstError
	return out
}

func (w *worker) arm(e *expectation) error {
	if e == nil {
		return errors.New("arm needs an expectation")
	}
	if w.fleet != nil {
		for _, c := range w.fleet.clients {
			c.mu.Lock()
			c.exp, c.res.MatchedAt = e, nil
			c.mu.Unlock()
		}
	}
	return nil
}

func (w *worker) results() any {
	out := []result{}
	if w.fleet != nil {
		for _, c := range w.fleet.clients {
			c.mu.Lock()
			out = append(out, c.res)
			c.mu.Unlock()
		}
	}
	return out
}

func (w *worker) recorded(withInitial bool) any {
	initial, changes := [][2]any{}, map[string][]byte{}
	if w.fleet != nil {
		for _, c := range w.fleet.clients {
			c.mu.Lock()
			if c.record {
				if withInitial {
					for _, r := range c.initial {
						initial = append(initial, [2]any{r.TypeURL, r.Raw})
					}
				}
				for k, v := range c.changes {
					changes[k] = v
				}
			}
			c.mu.Unlock()
		}
	}
	if !withInitial {
		return changes
	}
	return map[string]any{"initial": initial, "changes": changes}
}

// disconnect half-closes every stream, as proxies shutting down cleanly would, lets the server
// end them for up to grace, then cancels what is left and closes the connections.
func (w *worker) disconnect(grace time.Duration) {
	f := w.fleet
	if f == nil {
		return
	}
	for _, c := range f.clients {
		c.mu.Lock()
		c.closing = true
		s := c.stream
		c.mu.Unlock()
		if s != nil { // apart: a send blocked by a server that stopped reading must not hold up the rest
			go func(c *client, s grpc.ClientStream) {
				c.sendMu.Lock()
				defer c.sendMu.Unlock()
				_ = s.CloseSend()
			}(c, s)
		}
	}
	ended := make(chan struct{})
	go func() { f.done.Wait(); close(ended) }()
	select {
	case <-ended:
	case <-time.After(grace):
	}
	f.cancel()
	<-ended
	for _, conn := range f.conns {
		_ = conn.Close()
	}
	w.fleet = nil
}

func main() {
	w := &worker{cache: newCache()}
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	out := json.NewEncoder(os.Stdout)
	for {
		line, err := in.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) == 0 {
			if err != nil { // stdin closed: the coordinator is gone
				w.disconnect(time.Second)
				return
			}
			continue
		}
		var cmd command
		var reply any
		if err := json.Unmarshal(line, &cmd); err != nil {
			reply = map[string]string{"error": "bad command: " + err.Error()}
		} else {
			reply = w.handle(&cmd)
		}
		if err := out.Encode(reply); err != nil {
			fmt.Fprintln(os.Stderr, "simenvoy: reply:", err)
			return
		}
		if cmd.Cmd == "close" {
			return
		}
	}
}

func (w *worker) handle(cmd *command) any {
	var value any
	var err error
	switch cmd.Cmd {
	case "connect":
		value, err = w.connect(cmd)
	case "status":
		value = w.status()
	case "arm":
		err, value = w.arm(cmd.Expect), true
	case "results":
		value = w.results()
	case "recorded":
		value = w.recorded(true)
	case "recorded_changes": // the change responses alone: the initial config is megabytes
		value = w.recorded(false)
	case "disconnect", "close":
		w.disconnect(closeGrace)
		value = true
	default:
		err = fmt.Errorf("unknown command %q", cmd.Cmd)
	}
	if err != nil {
		return map[string]string{"error": err.Error()}
	}
	return map[string]any{"ok": value}
}
