// Command ttrpcbench is the Go side of bench/ttrpc_bench.py.
//
// It is the reference ttrpc server (github.com/containerd/ttrpc, as a shim
// uses it) and the one load client that drives both that server and
// cdtwist's Python one, plus a gRPC Version client that can speak mutual TLS
// over TCP (bench/goclient dials UNIX sockets only).  Built in GOPATH mode
// against /usr/share/gocode, like tests/ttrpc_go.
//
// Modes (the client modes print one JSON object on stdout):
//
//	ttrpcbench server       -addr SOCK                     serve until stdin closes; prints READY
//	ttrpcbench latency      -addr SOCK [-n 5000] [-warmup 200] [-size 0] [-samples]
//	ttrpcbench throughput   -addr SOCK [-c 16] [-conns 1] [-d 2s] [-warmup 300ms] [-size 0]
//	ttrpcbench grpc-wait    -addr ADDR [TLS flags] [-timeout 15s]
//	ttrpcbench grpc-latency -addr ADDR [TLS flags] [-n 2000] [-warmup 200] [-samples]
//
// TLS flags: -ca PEM -cert PEM -key PEM [-server-name localhost]; with -ca
// ADDR is host:port over TCP+TLS, without it ADDR is a UNIX socket path.
//
// The bench call is containerd.task.v2.Task/State: the request id carries
// -size bytes ("bench" when 0) and the server echoes it back as the
// response id (so a 64 KiB call moves 64 KiB each way).  Every loop is
// bounded by a count or a deadline.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	versionapi "github.com/containerd/containerd/api/services/version/v1"
	task "github.com/containerd/containerd/runtime/v2/task"
	"github.com/containerd/ttrpc"
	ptypes "github.com/gogo/protobuf/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
)

const taskService = "containerd.task.v2.Task"

func emit(v interface{}) {
	if err := json.NewEncoder(os.Stdout).Encode(v); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "ttrpcbench: "+format+"\n", args...)
	os.Exit(1)
}

// ---------------------------------------------------------------- stats

type stats struct {
	N      int     `json:"n"`
	MinUS  float64 `json:"min_us"`
	P50US  float64 `json:"p50_us"`
	P90US  float64 `json:"p90_us"`
	P99US  float64 `json:"p99_us"`
	MaxUS  float64 `json:"max_us"`
	MeanUS float64 `json:"mean_us"`
}

// summarize sorts d in place (same percentile rule as bench/goclient).
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

func samplesNS(d []time.Duration) []int64 {
	ns := make([]int64, len(d))
	for i, x := range d {
		ns[i] = int64(x)
	}
	return ns
}

// ---------------------------------------------------------------- ttrpc server

func serve(path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	// The same handshake a shim's server does (and cdtwist's default).
	srv, err := ttrpc.NewServer(ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()))
	if err != nil {
		return err
	}
	srv.Register(taskService, map[string]ttrpc.Method{
		"State": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req task.StateRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &task.StateResponse{ID: req.ID, Pid: 1}, nil
		},
	})
	go func() {
		// The bench holds our stdin: when it goes away (even SIGKILLed), so do we.
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		srv.Close()
		os.Remove(path)
		os.Exit(0)
	}()
	fmt.Println("READY")
	return srv.Serve(context.Background(), l)
}

// ---------------------------------------------------------------- ttrpc client

func benchID(size int) string {
	if size <= 0 {
		return "bench"
	}
	return strings.Repeat("x", size)
}

func ttrpcConnect(path string) (*ttrpc.Client, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(conn), nil
}

// stateCall makes one State call and checks the echo.  No deadline on the
// context: it would travel as timeout_nano and add a timer per call on the
// server; the bench script bounds the whole process instead.
func stateCall(tc task.TaskService, req *task.StateRequest) error {
	resp, err := tc.State(context.Background(), req)
	if err != nil {
		return err
	}
	if len(resp.ID) != len(req.ID) {
		return fmt.Errorf("echo: got %d bytes, sent %d", len(resp.ID), len(req.ID))
	}
	return nil
}

func runLatency(args []string) {
	fs := flag.NewFlagSet("latency", flag.ExitOnError)
	addr := fs.String("addr", "", "ttrpc socket")
	n := fs.Int("n", 5000, "measured sequential calls")
	warmup := fs.Int("warmup", 200, "unmeasured calls first")
	size := fs.Int("size", 0, "request id bytes (echoed back)")
	raw := fs.Bool("samples", false, "also print every sample (ns), in call order")
	_ = fs.Parse(args)
	c, err := ttrpcConnect(*addr)
	if err != nil {
		fail("dial: %v", err)
	}
	defer c.Close()
	tc := task.NewTaskClient(c)
	req := &task.StateRequest{ID: benchID(*size)}
	for i := 0; i < *warmup; i++ {
		if err := stateCall(tc, req); err != nil {
			fail("warmup State: %v", err)
		}
	}
	d := make([]time.Duration, 0, *n)
	start := time.Now()
	for i := 0; i < *n; i++ {
		t0 := time.Now()
		if err := stateCall(tc, req); err != nil {
			fail("State: %v", err)
		}
		d = append(d, time.Since(t0))
	}
	wall := time.Since(start)
	out := map[string]interface{}{
		"rpc": "State", "size": *size, "calls_total": *n + *warmup, "wall_s": wall.Seconds(),
		"calls_per_s": float64(*n) / wall.Seconds(),
	}
	if *raw {
		out["samples_ns"] = samplesNS(d)
	}
	out["stats"] = summarize(d)
	emit(out)
}

func runThroughput(args []string) {
	fs := flag.NewFlagSet("throughput", flag.ExitOnError)
	addr := fs.String("addr", "", "ttrpc socket")
	conc := fs.Int("c", 16, "concurrent calls (goroutines)")
	nconns := fs.Int("conns", 1, "connections the goroutines are spread over")
	dur := fs.Duration("d", 2*time.Second, "measured duration")
	warm := fs.Duration("warmup", 300*time.Millisecond, "unmeasured run first")
	size := fs.Int("size", 0, "request id bytes (echoed back)")
	_ = fs.Parse(args)
	if *nconns < 1 {
		*nconns = 1
	}
	if *conc < 1 {
		*conc = 1
	}
	clients := make([]task.TaskService, *nconns)
	for i := range clients {
		c, err := ttrpcConnect(*addr)
		if err != nil {
			fail("dial: %v", err)
		}
		defer c.Close()
		clients[i] = task.NewTaskClient(c)
	}
	req := &task.StateRequest{ID: benchID(*size)}
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
				tc := clients[g%len(clients)]
				for time.Now().Before(deadline) {
					t0 := time.Now()
					err := stateCall(tc, req)
					el := time.Since(t0)
					if err != nil {
						atomic.AddInt64(&bad, 1)
						mu.Lock()
						if firstErr == "" {
							firstErr = err.Error()
						}
						mu.Unlock()
						if errors.Is(err, ttrpc.ErrClosed) {
							return
						}
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
	warmOK, warmBad, _, _, warmErr := run(*warm, false)
	if warmOK == 0 && warmBad > 0 {
		fail("warmup: %s", warmErr)
	}
	ok, bad, wall, all, firstErr := run(*dur, true)
	emit(map[string]interface{}{
		"rpc": "State", "size": *size, "concurrency": *conc, "conns": *nconns, "ok": ok, "errors": bad,
		"first_error": firstErr, "wall_s": wall.Seconds(), "calls_per_s": float64(ok) / wall.Seconds(),
		"calls_total": ok + bad + warmOK + warmBad, "stats": summarize(all),
	})
}

// ---------------------------------------------------------------- gRPC Version client

type grpcFlags struct {
	addr, ca, cert, key, serverName *string
}

func addGRPCFlags(fs *flag.FlagSet) grpcFlags {
	return grpcFlags{
		addr:       fs.String("addr", "", "UNIX socket path, or host:port with -ca"),
		ca:         fs.String("ca", "", "PEM CA bundle the server certificate must chain to (enables TLS over TCP)"),
		cert:       fs.String("cert", "", "PEM client certificate"),
		key:        fs.String("key", "", "PEM client key"),
		serverName: fs.String("server-name", "localhost", "name the server certificate must carry"),
	}
}

func (f grpcFlags) transport() string {
	if *f.ca != "" {
		return "tls-tcp"
	}
	return "unix"
}

func (f grpcFlags) dial(ctx context.Context) (*grpc.ClientConn, error) {
	bc := backoff.DefaultConfig
	bc.BaseDelay = time.Millisecond
	bc.MaxDelay = 50 * time.Millisecond
	opts := []grpc.DialOption{
		grpc.WithBlock(),
		grpc.FailOnNonTempDialError(true),
		grpc.WithReturnConnectionError(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc, MinConnectTimeout: time.Second}),
	}
	if *f.ca == "" {
		// As bench/goclient: plaintext over the UNIX socket.
		opts = append(opts, grpc.WithInsecure(), grpc.WithContextDialer(
			func(ctx context.Context, addr string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", addr)
			}))
		return grpc.DialContext(ctx, *f.addr, opts...)
	}
	pem, err := os.ReadFile(*f.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no certificates", *f.ca)
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: *f.serverName, MinVersion: tls.VersionTLS12}
	if *f.cert != "" {
		pair, err := tls.LoadX509KeyPair(*f.cert, *f.key)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	return grpc.DialContext(ctx, *f.addr, opts...)
}

func version(ctx context.Context, conn *grpc.ClientConn) (string, error) {
	resp, err := versionapi.NewVersionClient(conn).Version(ctx, &ptypes.Empty{})
	if err != nil {
		return "", err
	}
	return resp.Version, nil
}

func runGRPCWait(args []string) {
	fs := flag.NewFlagSet("grpc-wait", flag.ExitOnError)
	f := addGRPCFlags(fs)
	timeout := fs.Duration("timeout", 15*time.Second, "give up after")
	interval := fs.Duration("interval", 5*time.Millisecond, "poll interval")
	_ = fs.Parse(args)
	deadline := time.Now().Add(*timeout)
	attempts := 0
	var lastErr error
	for time.Now().Before(deadline) {
		attempts++
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := f.dial(ctx)
		if err == nil {
			var v string
			v, err = version(ctx, conn)
			conn.Close()
			if err == nil {
				cancel()
				emit(map[string]interface{}{"transport": f.transport(), "attempts": attempts, "version": v})
				return
			}
		}
		cancel()
		lastErr = err
		time.Sleep(*interval)
	}
	fail("%s %s not serving after %s (%d attempts): %v", f.transport(), *f.addr, *timeout, attempts, lastErr)
}

func runGRPCLatency(args []string) {
	fs := flag.NewFlagSet("grpc-latency", flag.ExitOnError)
	f := addGRPCFlags(fs)
	n := fs.Int("n", 2000, "measured sequential calls")
	warmup := fs.Int("warmup", 200, "unmeasured calls first (the TLS handshake is among them)")
	raw := fs.Bool("samples", false, "also print every sample (ns), in call order")
	_ = fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t0 := time.Now()
	conn, err := f.dial(ctx)
	cancel()
	if err != nil {
		fail("dial %s: %v", f.transport(), err)
	}
	defer conn.Close()
	call := func() error {
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer ccancel()
		_, err := version(cctx, conn)
		return err
	}
	if err := call(); err != nil {
		fail("first Version: %v", err)
	}
	first := time.Since(t0) // connect (+ TLS handshake) + first call
	for i := 1; i < *warmup; i++ {
		if err := call(); err != nil {
			fail("warmup Version: %v", err)
		}
	}
	d := make([]time.Duration, 0, *n)
	start := time.Now()
	for i := 0; i < *n; i++ {
		t1 := time.Now()
		if err := call(); err != nil {
			fail("Version: %v", err)
		}
		d = append(d, time.Since(t1))
	}
	wall := time.Since(start)
	out := map[string]interface{}{
		"rpc": "Version", "transport": f.transport(), "wall_s": wall.Seconds(),
		"connect_first_call_us": float64(first) / 1e3,
	}
	if *raw {
		out["samples_ns"] = samplesNS(d)
	}
	out["stats"] = summarize(d)
	emit(out)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: ttrpcbench server|latency|throughput|grpc-wait|grpc-latency -addr ADDR ...")
	}
	switch os.Args[1] {
	case "server":
		fs := flag.NewFlagSet("server", flag.ExitOnError)
		addr := fs.String("addr", "", "socket to listen on")
		_ = fs.Parse(os.Args[2:])
		if err := serve(*addr); err != nil {
			fail("serve: %v", err)
		}
	case "latency":
		runLatency(os.Args[2:])
	case "throughput":
		runThroughput(os.Args[2:])
	case "grpc-wait":
		runGRPCWait(os.Args[2:])
	case "grpc-latency":
		runGRPCLatency(os.Args[2:])
	default:
		fail("unknown mode %q", os.Args[1])
	}
}
