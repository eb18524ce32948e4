// containerd's own snapshotter test suite (snapshots/testsuite), run through
// the gRPC proxy snapshotter (snapshots/proxy) against a daemon's socket, as
// a containerd client sees a snapshotter.  Driven by
// tests/integration/test_snapshots_testsuite.py:
//
//	SNAPSHOTS_ADDRESS      the daemon's gRPC socket
//	SNAPSHOTS_SNAPSHOTTER  the snapshotter to test ("overlayfs", "native")
//	SNAPSHOTS_PREFIX       namespace prefix, unique per run
//
// TestServePlugin runs the same suite against `cdtwist serve-plugin` (an
// external snapshotter, no namespaces): each test starts its own server on
// the test's root, as containerd's suite expects a fresh snapshotter per test.
//
//	SNAPSHOTS_SERVE_PLUGIN the command up to the kind, e.g.
//	                       "python3 -m cdtwist.cli serve-plugin overlayfs"
//
// The suite runs every test in the one namespace "testsuite" and relies on
// each test having a snapshotter of its own; through a shared daemon that
// is a namespace of its own, so every test gets a fresh namespace (and a
// lease in it, released when the test ends, so that the daemon's garbage
// collector never takes a snapshot a test is still using, as containerd
// clients work).
package snapshotsgo

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/leases"
	leaseproxy "github.com/containerd/containerd/leases/proxy"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var counter uint64

func dial(t *testing.T) *grpc.ClientConn {
	address := os.Getenv("SNAPSHOTS_ADDRESS")
	if address == "" {
		t.Skip("SNAPSHOTS_ADDRESS not set")
	}
	conn, err := dialUnix(address, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", address, err)
	}
	return conn
}

func dialUnix(address string, timeout time.Duration) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return grpc.DialContext(ctx, address,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}),
	)
}

// namespaced runs every call of the wrapped snapshotter in its own
// namespace, under its lease.
type namespaced struct {
	sn    snapshots.Snapshotter
	ns    string
	lease string
}

func (s *namespaced) with(ctx context.Context) context.Context {
	return leases.WithLease(namespaces.WithNamespace(ctx, s.ns), s.lease)
}

func (s *namespaced) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	return s.sn.Stat(s.with(ctx), key)
}

func (s *namespaced) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	return s.sn.Update(s.with(ctx), info, fieldpaths...)
}

func (s *namespaced) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	return s.sn.Usage(s.with(ctx), key)
}

func (s *namespaced) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return s.sn.Mounts(s.with(ctx), key)
}

func (s *namespaced) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.sn.Prepare(s.with(ctx), key, parent, opts...)
}

func (s *namespaced) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.sn.View(s.with(ctx), key, parent, opts...)
}

func (s *namespaced) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.sn.Commit(s.with(ctx), name, key, opts...)
}

func (s *namespaced) Remove(ctx context.Context, key string) error {
	return s.sn.Remove(s.with(ctx), key)
}

func (s *namespaced) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.sn.Walk(s.with(ctx), fn, filters...)
}

func (s *namespaced) Close() error {
	return s.sn.Close()
}

func TestSnapshotter(t *testing.T) {
	conn := dial(t)
	// The suite's tests are parallel: they run after this function returns.
	t.Cleanup(func() { conn.Close() })
	name := os.Getenv("SNAPSHOTS_SNAPSHOTTER")
	if name == "" {
		name = "overlayfs"
	}
	prefix := os.Getenv("SNAPSHOTS_PREFIX")
	if prefix == "" {
		prefix = fmt.Sprintf("suite%d", os.Getpid())
	}
	lm := leaseproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn))
	testsuite.SnapshotterSuite(t, name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		ns := fmt.Sprintf("%s-n%d", prefix, atomic.AddUint64(&counter, 1))
		lctx := namespaces.WithNamespace(context.Background(), ns)
		l, err := lm.Create(lctx, leases.WithRandomID(), leases.WithExpiration(time.Hour))
		if err != nil {
			return nil, nil, err
		}
		sn := &namespaced{
			sn:    proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name),
			ns:    ns,
			lease: l.ID,
		}
		return sn, func() error { return lm.Delete(lctx, l) }, nil
	})
}

func TestServePlugin(t *testing.T) {
	command := strings.Fields(os.Getenv("SNAPSHOTS_SERVE_PLUGIN"))
	if len(command) == 0 {
		t.Skip("SNAPSHOTS_SERVE_PLUGIN not set")
	}
	name := command[len(command)-1]
	testsuite.SnapshotterSuite(t, name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sock := filepath.Join(root, "sn.sock")
		logf, err := os.Create(filepath.Join(root, "serve-plugin.log"))
		if err != nil {
			return nil, nil, err
		}
		args := append(append([]string{}, command[1:]...), "--root", filepath.Join(root, "store"), "--address", sock)
		cmd := exec.Command(command[0], args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			logf.Close()
			return nil, nil, err
		}
		stop := func() error {
			cmd.Process.Signal(syscall.SIGTERM)
			err := cmd.Wait()
			logf.Close()
			return err
		}
		conn, err := dialUnix(sock, 30*time.Second)
		if err != nil {
			stop()
			out, _ := os.ReadFile(logf.Name())
			return nil, nil, fmt.Errorf("serve-plugin did not serve on %s: %v\n%s", sock, err, out)
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name)
		return sn, func() error {
			conn.Close()
			return stop()
		}, nil
	})
}
