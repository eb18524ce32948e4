// Command goclient is the load client of bench/daemon_bench.py.
//
// It speaks containerd's gRPC API (the generated code from containerd's own
// source tree) over a UNIX socket, so the client side is the same Go/grpc-go
// stack ctr uses and is not the bottleneck when measuring a daemon.
//
// Modes (each prints one JSON object on stdout):
//
//	goclient wait       -addr SOCK [-timeout 10s] [-interval 1ms]
//	goclient latency    -addr SOCK [-n 2000] [-warmup 200] [-samples]
//	goclient throughput -addr SOCK [-c 16] [-d 5s] [-conns 1]
//
// Every loop is bounded by a count or a deadline.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	namespacesapi "github.com/containerd/containerd/api/services/namespaces/v1"
	versionapi "github.com/containerd/containerd/api/services/version/v1"
	ptypes "github.com/gogo/protobuf/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// monoNS reads CLOCK_MONOTONIC, the clock behind Python's time.monotonic_ns()
// on Linux, so the bench script can subtract its own spawn timestamp.
func monoNS() int64 {
	var ts syscall.Timespec
	const clockMonotonic = 1
	_, _, errno := syscall.Syscall(syscall.SYS_CLOCK_GETTIME, clockMonotonic, uintptr(unsafe.Pointer(&ts)), 0)
	if errno != 0 {
		return time.Now().UnixNano()
	}
	return ts.Nano()
}

func dialer(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", addr)
}

func dial(ctx context.Context, addr string) (*grpc.ClientConn, error) {
	// Mirrors containerd's client: blocking dial over a unix socket, with a
	// short reconnect backoff so a fresh socket is picked up fast.
	bc := backoff.DefaultConfig
	bc.BaseDelay = time.Millisecond
	bc.MaxDelay = 50 * time.Millisecond
	return grpc.DialContext(ctx, addr,
		grpc.WithInsecure(), // grpc-go 1.33 (Debian 12): no credentials/insecure yet
		grpc.WithContextDialer(dialer),
		grpc.WithBlock(),
		grpc.FailOnNonTempDialError(true),
		grpc.WithReturnConnectionError(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc, MinConnectTimeout: time.Second}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)),
	)
}

func emit(v interface{}) {
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(v); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", args...)
	os.Exit(1)
}

// tryVersion makes one connection and one Version call, both bounded.
func tryVersion(addr string, timeout time.Duration) (string, error) {
	// A cheap raw connect first: no grpc machinery while nothing listens.
	c, err := net.DialTimeout("unix", addr, timeout)
	if err != nil {
		return "", err
	}
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := dial(ctx, addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	resp, err := versionapi.NewVersionClient(conn).Version(ctx, &ptypes.Empty{})
	if err != nil {
		return "", err
	}
	return resp.Version, nil
}

func runWait(args []string) {
	fs := flag.NewFlagSet("wait", flag.ExitOnError)
	addr := fs.String("addr", "", "daemon socket")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after")
	interval := fs.Duration("interval", time.Millisecond, "poll interval")
	_ = fs.Parse(args)
	start := time.Now()
	deadline := start.Add(*timeout)
	attempts := 0
	var lastErr error
	for time.Now().Before(deadline) {
		attempts++
		v, err := tryVersion(*addr, 2*time.Second)
		if err == nil {
			emit(map[string]interface{}{"ready_mono_ns": monoNS(), "attempts": attempts, "version": v})
			return
		}
		lastErr = err
		time.Sleep(*interval)
	}
	fail("not serving after %s (%d attempts): %v", *timeout, attempts, lastErr)
}

type stats struct {
	N      int     `json:"n"`
	MinUS  float64 `json:"min_us"`
	P50US  float64 `json:"p50_us"`
	P90US  float64 `json:"p90_us"`
	P99US  float64 `json:"p99_us"`
	MaxUS  float64 `json:"max_us"`
	MeanUS float64 `json:"mean_us"`
}

func summarize(d []time.Duration) stats {
	if len(d) == 0 {
		return stats{}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	pct := func(p float64) float64 {
		i := int(p*float64(len(d)) + 0.5)
		if i >= len(d) {
			i = len(d) - 1
		}
		return float64(d[i]) / 1e3
	}
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	return stats{
		N: len(d), MinUS: float64(d[0]) / 1e3, P50US: pct(0.50), P90US: pct(0.90), P99US: pct(0.99),
		MaxUS: float64(d[len(d)-1]) / 1e3, MeanUS: float64(sum) / float64(len(d)) / 1e3,
	}
}

func runLatency(args []string) {
	fs := flag.NewFlagSet("latency", flag.ExitOnError)
	addr := fs.String("addr", "", "daemon socket")
	n := fs.Int("n", 2000, "measured calls")
	warmup := fs.Int("warmup", 200, "unmeasured calls first")
	raw := fs.Bool("samples", false, "also print every sample (ns), in call order")
	_ = fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	conn, err := dial(ctx, *addr)
	cancel()
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	client := versionapi.NewVersionClient(conn)
	call := func() error {
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer ccancel()
		_, err := client.Version(cctx, &ptypes.Empty{})
		return err
	}
	for i := 0; i < *warmup; i++ {
		if err := call(); err != nil {
			fail("warmup Version: %v", err)
		}
	}
	d := make([]time.Duration, 0, *n)
	start := time.Now()
	for i := 0; i < *n; i++ {
		t0 := time.Now()
		if err := call(); err != nil {
			fail("Version: %v", err)
		}
		d = append(d, time.Since(t0))
	}
	wall := time.Since(start)
	out := map[string]interface{}{"rpc": "Version", "wall_s": wall.Seconds()}
	if *raw {
		ns := make([]int64, len(d))
		for i, x := range d {
			ns[i] = int64(x)
		}
		out["samples_ns"] = ns
	}
	out["stats"] = summarize(d) // sorts d in place
	emit(out)
}

func runThroughput(args []string) {
	fs := flag.NewFlagSet("throughput", flag.ExitOnError)
	addr := fs.String("addr", "", "daemon socket")
	conc := fs.Int("c", 16, "concurrent streams (goroutines)")
	dur := fs.Duration("d", 5*time.Second, "measured duration")
	nconns := fs.Int("conns", 1, "connections the streams are spread over")
	warm := fs.Duration("warmup", 500*time.Millisecond, "unmeasured run first")
	_ = fs.Parse(args)
	if *nconns < 1 {
		*nconns = 1
	}
	clients := make([]namespacesapi.NamespacesClient, *nconns)
	for i := range clients {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := dial(ctx, *addr)
		cancel()
		if err != nil {
			fail("dial: %v", err)
		}
		defer conn.Close()
		clients[i] = namespacesapi.NewNamespacesClient(conn)
	}
	run := func(d time.Duration, record bool) (int64, int64, time.Duration, []time.Duration, string) {
		var ok, bad int64
		var mu sync.Mutex
		var firstErr string
		lat := make([][]time.Duration, *conc)
		deadline := time.Now().Add(d)
		var wg sync.WaitGroup
		start := time.Now()
		for g := 0; g < *conc; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				cl := clients[g%len(clients)]
				for time.Now().Before(deadline) {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					t0 := time.Now()
					_, err := cl.List(ctx, &namespacesapi.ListNamespacesRequest{})
					el := time.Since(t0)
					cancel()
					if err != nil {
						atomic.AddInt64(&bad, 1)
						mu.Lock()
						if firstErr == "" {
							firstErr = err.Error()
						}
						mu.Unlock()
						continue
					}
					atomic.AddInt64(&ok, 1)
					if record {
						lat[g] = append(lat[g], el)
					}
				}
			}(g)
		}
		wg.Wait()
		wall := time.Since(start)
		var all []time.Duration
		for _, l := range lat {
			all = append(all, l...)
		}
		return ok, bad, wall, all, firstErr
	}
	run(*warm, false)
	ok, bad, wall, all, firstErr := run(*dur, true)
	emit(map[string]interface{}{
		"rpc": "namespaces.List", "concurrency": *conc, "conns": *nconns, "ok": ok, "errors": bad,
		"first_error": firstErr, "wall_s": wall.Seconds(), "calls_per_s": float64(ok) / wall.Seconds(),
		"stats": summarize(all),
	})
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: goclient wait|latency|throughput -addr SOCK ...")
	}
	switch os.Args[1] {
	case "wait":
		runWait(os.Args[2:])
	case "latency":
		runLatency(os.Args[2:])
	case "throughput":
		runThroughput(os.Args[2:])
	default:
		fail("unknown mode %q", os.Args[1])
	}
}
