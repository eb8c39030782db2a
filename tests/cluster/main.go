// Command kube is a multi-call binary bundling a Kubernetes control plane
// (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and,
// unless built with -tags nokubectl, kubectl) for integration tests.
//
// Usage: kube <component> [component flags...]
//
// The component can also be selected by the program name (argv[0]), so a
// symlink named e.g. "kubectl" pointing at this binary works too.
package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	_ "time/tzdata" // CronJob time zone support, as upstream mains

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream mains
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream mains
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as upstream mains

	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// components maps a component name to its entry point, which gets the
// arguments after the component name and returns the process exit code.
var components = map[string]func(args []string) int{
	"etcd":                    runEtcd,
	"kube-apiserver":          cobraMain(func() *cobra.Command { return apiserver.NewAPIServerCommand() }),
	"kube-controller-manager": cobraMain(func() *cobra.Command { return controllermanager.NewControllerManagerCommand() }),
	"kube-scheduler":          cobraMain(func() *cobra.Command { return scheduler.NewSchedulerCommand() }),
}

func cobraMain(newCmd func() *cobra.Command) func([]string) int {
	return func(args []string) int {
		cmd := newCmd()
		cmd.SetArgs(args)
		return cli.Run(cmd)
	}
}

func usage() {
	names := make([]string, 0, len(components))
	for n := range components {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: kube <%s> [flags...]\n", strings.Join(names, "|"))
}

func main() {
	if run, ok := components[filepath.Base(os.Args[0])]; ok {
		os.Exit(run(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	run, ok := components[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "kube: unknown component %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	// Make argv[0] look like the component for anything that prints it.
	os.Args = append([]string{os.Args[1]}, os.Args[2:]...)
	os.Exit(run(os.Args[1:]))
}

// runEtcd runs a single-member embedded etcd until SIGINT/SIGTERM.
func runEtcd(args []string) int {
	fs := flag.NewFlagSet("etcd", flag.ContinueOnError)
	name := fs.String("name", "default", "member name")
	dataDir := fs.String("data-dir", "", "data directory (required)")
	clientURL := fs.String("listen-client-urls", "http://127.0.0.1:2379", "comma-separated client URLs to listen on (also advertised)")
	peerURL := fs.String("listen-peer-urls", "http://127.0.0.1:2380", "comma-separated peer URLs to listen on (also advertised)")
	metricsURL := fs.String("listen-metrics-urls", "", "optional comma-separated URLs for /metrics and /health")
	logLevel := fs.String("log-level", "warn", "debug, info, warn, error")
	quotaBytes := fs.Int64("quota-backend-bytes", 0, "backend size quota (0 = etcd default)")
	unsafeNoFsync := fs.Bool("unsafe-no-fsync", false, "disable fsync (faster; fine for throw-away test clusters)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dataDir == "" {
		fmt.Fprintln(os.Stderr, "etcd: --data-dir is required")
		return 2
	}
	parse := func(flagName, s string) ([]url.URL, error) {
		var out []url.URL
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p == "" {
				continue
			}
			u, err := url.Parse(p)
			if err != nil {
				return nil, fmt.Errorf("--%s: %w", flagName, err)
			}
			out = append(out, *u)
		}
		return out, nil
	}
	clients, err := parse("listen-client-urls", *clientURL)
	if err == nil && len(clients) == 0 {
		err = fmt.Errorf("--listen-client-urls is empty")
	}
	var peers, metrics []url.URL
	if err == nil {
		peers, err = parse("listen-peer-urls", *peerURL)
	}
	if err == nil && len(peers) == 0 {
		err = fmt.Errorf("--listen-peer-urls is empty")
	}
	if err == nil {
		metrics, err = parse("listen-metrics-urls", *metricsURL)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd:", err)
		return 2
	}

	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = clients
	cfg.AdvertiseClientUrls = clients
	cfg.ListenPeerUrls = peers
	cfg.AdvertisePeerUrls = peers
	cfg.ListenMetricsUrls = metrics
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = *logLevel
	cfg.QuotaBackendBytes = *quotaBytes
	cfg.UnsafeNoFsync = *unsafeNoFsync

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd: start:", err)
		return 1
	}
	defer e.Close()

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd: ready, serving clients on %s\n", *clientURL)
	case <-time.After(60 * time.Second):
		fmt.Fprintln(os.Stderr, "etcd: not ready after 60s")
		return 1
	case s := <-sigs:
		fmt.Fprintln(os.Stderr, "etcd: got", s, "before ready")
		return 1
	}
	select {
	case err := <-e.Err():
		fmt.Fprintln(os.Stderr, "etcd: serve error:", err)
		return 1
	case <-e.Server.StopNotify():
		fmt.Fprintln(os.Stderr, "etcd: server stopped")
		return 1
	case s := <-sigs:
		fmt.Fprintln(os.Stderr, "etcd: got", s, "- shutting down")
		return 0
	}
}
