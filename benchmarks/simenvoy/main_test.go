package main

import (
	"fmt"
	"slices"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const clusters = 20

func cluster(i int) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 fmt.Sprintf("outbound|80||svc-%03d.bench.svc.cluster.local", i),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{
			EdsConfig: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}},
	}
}

func pack(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func marshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func deltaCDS(t *testing.T, version, nonce string, cs []*clusterv3.Cluster, removed ...string) []byte {
	resp := &discoveryv3.DeltaDiscoveryResponse{SystemVersionInfo: version, TypeUrl: clusterT, Nonce: nonce,
		RemovedResources: removed}
	for _, c := range cs {
		resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: c.Name, Version: c.Name + "-1",
			Resource: pack(t, c)})
	}
	return marshal(t, resp)
}

func names(cs []*clusterv3.Cluster) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.Name
	}
	slices.Sort(out)
	return out
}

// Two clients getting the same clusters (other version, other nonce) share one decoded result,
// and each asks for the clusters' endpoints, sorted, in one subscribe request; a later response
// removing one cluster unsubscribes its endpoints only.
func TestDeltaClientsShareDecodedClustersAndFollowEDSNames(t *testing.T) {
	c := newCache()
	cs := make([]*clusterv3.Cluster, clusters)
	for i := range cs {
		cs[i] = cluster(clusters - i) // out of order: the subscription is sorted
	}
	var subs []*subscription
	for i, nonce := range []string{"n1", "n2"} {
		cl := newClient(&corev3.Node{Id: fmt.Sprint("sidecar~", i)}, true, c, false)
		typeURL, reqs, err := cl.deltaResponse(deltaCDS(t, "v"+nonce, nonce, cs))
		if err != nil || typeURL != clusterT || len(reqs) != 2 {
			t.Fatalf("response: %v %q %d requests", err, typeURL, len(reqs))
		}
		ack, sub := reqs[0].(*discoveryv3.DeltaDiscoveryRequest), reqs[1].(*discoveryv3.DeltaDiscoveryRequest)
		if ack.TypeUrl != clusterT || ack.ResponseNonce != nonce || ack.Node.GetId() == "" {
			t.Fatalf("ACK %v", ack)
		}
		if sub.TypeUrl != endpointT || !slices.Equal(sub.ResourceNamesSubscribe, names(cs)) {
			t.Fatalf("subscribe %v", sub)
		}
		subs = append(subs, cl.types[endpointT].subscribed)
		if len(c.responses) != 1 {
			t.Fatalf("%d decoded responses cached, want 1", len(c.responses))
		}
		if i == 1 {
			removal := marshal(t, &discoveryv3.DeltaDiscoveryResponse{TypeUrl: clusterT, Nonce: "n3",
				RemovedResources: []string{cs[0].Name}})
			_, reqs, err = cl.deltaResponse(removal)
			if err != nil || len(reqs) != 2 {
				t.Fatalf("removal: %v, %d requests", err, len(reqs))
			}
			change := reqs[1].(*discoveryv3.DeltaDiscoveryRequest)
			if !slices.Equal(change.ResourceNamesUnsubscribe, []string{cs[0].Name}) || len(change.ResourceNamesSubscribe) != 0 {
				t.Fatalf("removal request %v", change)
			}
			if len(cl.types[endpointT].subscribed.set) != clusters-1 {
				t.Fatalf("still subscribed to %d", len(cl.types[endpointT].subscribed.set))
			}
		}
	}
	if subs[0] != subs[1] {
		t.Fatal("two clients with the same clusters should share one subscription")
	}
}

// A SotW client asks for the RDS names its listeners use and repeats the names it subscribes to
// in every ACK, as Envoy does; it is ready once every subscribed name arrived.
func TestSotwClientFollowsRouteNamesAndRepeatsThemInACKs(t *testing.T) {
	hcm := &hcmv3.HttpConnectionManager{RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{
		Rds: &hcmv3.Rds{RouteConfigName: "8080"}}}
	listener := &listenerv3.Listener{Name: "outbound", DefaultFilterChain: &listenerv3.FilterChain{
		Filters: []*listenerv3.Filter{{Name: "hcm", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: pack(t, hcm)}}}}}
	cl := newClient(&corev3.Node{Id: "sidecar~1"}, false, newCache(), false)
	lds := marshal(t, &discoveryv3.DiscoveryResponse{VersionInfo: "1", Nonce: "a", TypeUrl: listenerT,
		Resources: []*anypb.Any{pack(t, listener)}})
	_, reqs, err := cl.sotwResponse(lds)
	if err != nil || len(reqs) != 2 {
		t.Fatalf("%v, %d requests", err, len(reqs))
	}
	rds := reqs[1].(*discoveryv3.DiscoveryRequest)
	if rds.TypeUrl != routeT || !slices.Equal(rds.ResourceNames, []string{"8080"}) {
		t.Fatalf("RDS request %v", rds)
	}
	route := marshal(t, &discoveryv3.DiscoveryResponse{VersionInfo: "7", Nonce: "b", TypeUrl: routeT,
		Resources: []*anypb.Any{pack(t, &routev3.RouteConfiguration{Name: "8080"})}})
	_, reqs, err = cl.sotwResponse(route)
	if err != nil || len(reqs) != 1 {
		t.Fatalf("%v, %d requests", err, len(reqs))
	}
	ack := reqs[0].(*discoveryv3.DiscoveryRequest)
	if ack.VersionInfo != "7" || ack.ResponseNonce != "b" || !slices.Equal(ack.ResourceNames, []string{"8080"}) {
		t.Fatalf("ACK %v", ack)
	}
	if cl.complete() {
		t.Fatal("ready before CDS was ACKed")
	}
	cds := marshal(t, &discoveryv3.DiscoveryResponse{VersionInfo: "1", Nonce: "c", TypeUrl: clusterT})
	if _, _, err = cl.sotwResponse(cds); err != nil || !cl.complete() {
		t.Fatalf("not ready after CDS, LDS and RDS: %v", err)
	}
}

// A change is recognised by every needle, near the first one or anywhere else; a response with
// only some of them does not match.
func TestExpectationNeedsEveryNeedle(t *testing.T) {
	weighted := func(name string, weight uint32) []byte {
		return marshal(t, &routev3.WeightedCluster_ClusterWeight{Name: name, Weight: wrapperspb.UInt32(weight)})
	}
	a, b := weighted("outbound|80|v1|svc", 30), weighted("outbound|80|v2|svc", 70)
	e := &expectation{Kind: "route", TypeURL: routeT, Needles: [][]byte{a, b}}
	filler := make([]byte, 10000)
	if !e.matches(slices.Concat(a, b)) || !e.matches(slices.Concat(b, filler, a)) {
		t.Fatal("every needle present: should match")
	}
	if e.matches(slices.Concat(filler, a)) || e.matches(b) {
		t.Fatal("a needle missing: should not match")
	}
	if (&expectation{}).matches(a) {
		t.Fatal("no needles: nothing matches")
	}
}

func TestFirstStringReadsFieldOneOnly(t *testing.T) {
	if got := firstString(marshal(t, &routev3.RouteConfiguration{Name: "8080"})); got != "8080" {
		t.Fatalf("got %q", got)
	}
	if got := firstString([]byte{0x12, 0x01, 'x'}); got != "" {
		t.Fatalf("field 2 taken as a name: %q", got)
	}
	if got := firstString([]byte{0x0A, 0x05, 'x'}); got != "" {
		t.Fatalf("truncated name taken: %q", got)
	}
}

// The protowire reading gives what proto.Unmarshal would, with resources' bytes taken from the
// message itself (not copied).
func TestParseResponseReadsWhatUnmarshalDoes(t *testing.T) {
	cs := []*clusterv3.Cluster{cluster(1), cluster(2)}
	raw := deltaCDS(t, "v9", "n9", cs, "gone-a", "gone-b")
	got, err := parseResponse(raw, true)
	if err != nil {
		t.Fatal(err)
	}
	want := &discoveryv3.DeltaDiscoveryResponse{}
	if err := proto.Unmarshal(raw, want); err != nil {
		t.Fatal(err)
	}
	if got.version != "v9" || got.nonce != "n9" || got.typeURL != clusterT ||
		!slices.Equal(got.removed, want.RemovedResources) || len(got.items) != 2 {
		t.Fatalf("delta: %+v", got)
	}
	for i, it := range got.items {
		if it.name != want.Resources[i].Name || !slices.Equal(it.value, want.Resources[i].Resource.Value) {
			t.Fatalf("delta resource %d: %q", i, it.name)
		}
		bytesIndex(t, raw, it.value) // fails unless the value lies inside the message
	}
	sotw := marshal(t, &discoveryv3.DiscoveryResponse{VersionInfo: "3", Nonce: "x", TypeUrl: routeT,
		Resources: []*anypb.Any{pack(t, &routev3.RouteConfiguration{Name: "8080"}), pack(t, &routev3.RouteConfiguration{Name: "9090"})}})
	got, err = parseResponse(sotw, false)
	if err != nil || got.version != "3" || got.nonce != "x" || got.typeURL != routeT || len(got.items) != 2 ||
		got.items[0].name != "8080" || got.items[1].name != "9090" {
		t.Fatalf("sotw: %+v, %v", got, err)
	}
	if _, err := parseResponse(sotw[:len(sotw)-1], false); err == nil {
		t.Fatal("a truncated response should not parse")
	}
}

func bytesIndex(t *testing.T, haystack, needle []byte) int {
	t.Helper()
	for i := range len(haystack) - len(needle) + 1 {
		if &haystack[i] == &needle[0] {
			return i
		}
	}
	t.Fatal("a resource's bytes were copied out of the message")
	return -1
}

// A delta client whose route configuration names VHDS subscribes to virtual hosts with no names,
// as Envoy does, once; it is ready only after its first VHDS answer; a route change expected as
// RDS is found in a VHDS response (the virtual host it changed).
func TestDeltaClientTakesVirtualHostsOverVHDS(t *testing.T) {
	cl := newClient(&corev3.Node{Id: "sidecar~1"}, true, newCache(), false)
	cl.types[clusterT].acked, cl.types[listenerT].acked = true, true
	cl.types[routeT].subscribe(cl.cache.subscription(map[string]struct{}{"outbound": {}}))
	base := &routev3.RouteConfiguration{Name: "outbound", Vhds: &routev3.Vhds{ConfigSource: &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}}
	rds := marshal(t, &discoveryv3.DeltaDiscoveryResponse{TypeUrl: routeT, Nonce: "r1",
		Resources: []*discoveryv3.Resource{{Name: "outbound", Version: "1", Resource: pack(t, base)}}})
	_, reqs, err := cl.deltaResponse(rds)
	if err != nil || len(reqs) != 2 {
		t.Fatalf("%v, %d requests", err, len(reqs))
	}
	sub := reqs[1].(*discoveryv3.DeltaDiscoveryRequest)
	if sub.TypeUrl != vhostT || len(sub.ResourceNamesSubscribe) != 0 || sub.ResponseNonce != "" {
		t.Fatalf("VHDS subscription %v", sub)
	}
	if cl.complete() {
		t.Fatal("ready before the first VHDS answer")
	}
	if _, again, _ := cl.deltaResponse(rds); len(again) != 1 {
		t.Fatalf("subscribed to VHDS again: %d requests", len(again))
	}
	vhost := &routev3.VirtualHost{Name: "outbound/svc-001:80", Domains: []string{"svc-001"}, Routes: []*routev3.Route{{
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{
			Cluster: "outbound|80|v2|svc-001"}}}}}}
	vhds := marshal(t, &discoveryv3.DeltaDiscoveryResponse{TypeUrl: vhostT, Nonce: "v1",
		Resources: []*discoveryv3.Resource{{Name: vhost.Name, Version: "1", Resource: pack(t, vhost)}}})
	cl.exp = &expectation{Kind: "route", TypeURL: routeT, Needles: [][]byte{[]byte("outbound|80|v2|svc-001")}}
	if err := cl.onResponse(nopStream{}, vhds); err != nil {
		t.Fatal(err)
	}
	if cl.res.ReadyAt == nil || cl.res.MatchedAt == nil { // ready: the VHDS answer was the last thing missing
		t.Fatalf("ready at %v, matched at %v", cl.res.ReadyAt, cl.res.MatchedAt)
	}
	plain := newClient(&corev3.Node{Id: "sidecar~2"}, true, newCache(), false)
	whole := &routev3.RouteConfiguration{Name: "outbound", VirtualHosts: []*routev3.VirtualHost{vhost}}
	if _, reqs, _ := plain.deltaResponse(marshal(t, &discoveryv3.DeltaDiscoveryResponse{TypeUrl: routeT, Nonce: "r",
		Resources: []*discoveryv3.Resource{{Name: "outbound", Resource: pack(t, whole)}}})); len(reqs) != 1 {
		t.Fatalf("a route configuration without VHDS: %d requests", len(reqs))
	}
}

// nopStream takes the requests a client sends and drops them (only SendMsg is called).
type nopStream struct{ grpc.ClientStream }

func (nopStream) SendMsg(any) error { return nil }
