//go:build tools

// Package tools records the etcd command that tests/k8s/build-tools.sh builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
