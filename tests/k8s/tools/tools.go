//go:build tools

// Package tools records the Kubernetes commands that tests/k8s/build-tools.sh builds, so that
// go.mod and go.sum pin them (and everything they link) to one reviewed version.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
