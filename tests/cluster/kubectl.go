//go:build !nokubectl

package main

import (
	_ "k8s.io/client-go/plugin/pkg/client/auth" // client auth plugins, as upstream kubectl
	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func init() {
	components["kubectl"] = func(args []string) int {
		cmd := kubectl.NewDefaultKubectlCommand()
		cmd.SetArgs(args)
		if err := cli.RunNoErrOutput(cmd); err != nil {
			util.CheckErr(err) // prints and exits non-zero
		}
		return 0
	}
}
