package main

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// response is what a client reads from a DiscoveryResponse or DeltaDiscoveryResponse. It is
// decoded with protowire so that resources' bytes alias the received message: proto.Unmarshal
// copies every bytes field, and copying (with the zeroing and collection of what it allocates)
// was most of a client's CPU per 0.57 MB route configuration (perf, session 29).
type response struct {
	version, typeURL, nonce string
	items                   []item   // name and serialized resource (the Any's value), in order
	removed                 []string // delta only
}

// Field numbers in envoy.service.discovery.v3 and google.protobuf.Any.
const (
	fVersion   = 1 // (system_)version_info
	fResources = 2
	fTypeURL   = 4
	fNonce     = 5
	fRemoved   = 6 // DeltaDiscoveryResponse.removed_resources (SotW: control_plane, skipped)
	fAnyValue  = 2
	fResName   = 3 // Resource.name
	fResAny    = 2 // Resource.resource
	fRouteVhds = 9 // envoy.config.route.v3.RouteConfiguration.vhds
)

// fields calls visit with every length-delimited field of msg; other wire types are skipped.
func fields(msg []byte, visit func(num protowire.Number, value []byte)) error {
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return protowire.ParseError(n)
		}
		msg = msg[n:]
		if typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, msg); n < 0 {
				return protowire.ParseError(n)
			}
			msg = msg[n:]
			continue
		}
		value, n := protowire.ConsumeBytes(msg)
		if n < 0 {
			return protowire.ParseError(n)
		}
		msg = msg[n:]
		visit(num, value)
	}
	return nil
}

func anyValue(msg []byte) ([]byte, error) {
	var value []byte
	err := fields(msg, func(num protowire.Number, v []byte) {
		if num == fAnyValue {
			value = v
		}
	})
	return value, err
}

func parseResponse(raw []byte, delta bool) (*response, error) {
	r := &response{}
	var inner error
	err := fields(raw, func(num protowire.Number, v []byte) {
		switch num {
		case fVersion:
			r.version = string(v)
		case fTypeURL:
			r.typeURL = string(v)
		case fNonce:
			r.nonce = string(v)
		case fRemoved:
			if delta {
				r.removed = append(r.removed, string(v))
			}
		case fResources:
			it, err := resourceItem(v, delta)
			if err != nil && inner == nil {
				inner = err
			}
			r.items = append(r.items, it)
		}
	})
	if err == nil {
		err = inner
	}
	if err != nil {
		return nil, fmt.Errorf("decoding a response: %w", err)
	}
	return r, nil
}

// resourceItem: a SotW resource is an Any named by its value's field 1; a delta one is a
// Resource with its own name.
func resourceItem(msg []byte, delta bool) (item, error) {
	if !delta {
		value, err := anyValue(msg)
		return item{firstString(value), value}, err
	}
	var it item
	var inner error
	err := fields(msg, func(num protowire.Number, v []byte) {
		switch num {
		case fResName:
			it.name = string(v)
		case fResAny:
			it.value, inner = anyValue(v)
		}
	})
	if err == nil {
		err = inner
	}
	return it, err
}
