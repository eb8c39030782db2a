//go:build tools

// Package csi pins the CSI conformance suite, csi-sanity, for the CSI node plugin's tests;
// build.sh builds it with `go build github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity`.
package csi

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
