//go:build !nonode

package main

import (
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// The node's components, for the e2e tests' real node (issue 25); left out
// with -tags nonode for a control-plane-only binary.
func init() {
	components["kubelet"] = cobraMain(kubelet.NewKubeletCommand)
	components["kube-proxy"] = cobraMain(proxy.NewProxyCommand)
}
