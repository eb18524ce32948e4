// containerd's own content test suite (content/testsuite), run through the
// gRPC proxy store (content/proxy) against a daemon's socket, as a containerd
// client sees the content store.  Driven by tests/integration/test_content_testsuite.py:
//
//	CONTENT_ADDRESS  the daemon's gRPC socket
//	CONTENT_POLICY   "shared" or "isolated": the daemon's content_sharing_policy
//	CONTENT_PREFIX   namespace prefix, unique per run
//
// Every test context gets its own namespace and a lease in it (released
// when the test ends), so the daemon's garbage collector never takes content
// a test is still looking at, as containerd's client tests do.
package contentgo

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/content/proxy"
	"github.com/containerd/containerd/content/testsuite"
	"github.com/containerd/containerd/leases"
	leaseproxy "github.com/containerd/containerd/leases/proxy"
	"github.com/containerd/containerd/namespaces"
	"google.golang.org/grpc"
)

var counter uint64

func dial(t *testing.T) *grpc.ClientConn {
	address := os.Getenv("CONTENT_ADDRESS")
	if address == "" {
		t.Skip("CONTENT_ADDRESS not set")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, address,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)),
	)
	if err != nil {
		t.Fatalf("dial %s: %v", address, err)
	}
	return conn
}

func storeFn(t *testing.T, conn *grpc.ClientConn) testsuite.StoreInitFn {
	prefix := os.Getenv("CONTENT_PREFIX")
	if prefix == "" {
		prefix = fmt.Sprintf("suite%d", os.Getpid())
	}
	lm := leaseproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn))
	return func(ctx context.Context, root string) (context.Context, content.Store, func() error, error) {
		wrap := func(ctx context.Context) (context.Context, func(context.Context) error, error) {
			n := atomic.AddUint64(&counter, 1)
			ctx = namespaces.WithNamespace(ctx, fmt.Sprintf("%s-n%d", prefix, n))
			l, err := lm.Create(ctx, leases.WithRandomID(), leases.WithExpiration(time.Hour))
			if err != nil {
				return nil, nil, err
			}
			return leases.WithLease(ctx, l.ID), func(ctx context.Context) error {
				return lm.Delete(ctx, l)
			}, nil
		}
		ctx = testsuite.SetContextWrapper(ctx, wrap)
		cs := proxy.NewContentStore(contentapi.NewContentClient(conn))
		return ctx, cs, func() error { return nil }, nil
	}
}

func TestContent(t *testing.T) {
	conn := dial(t)
	defer conn.Close()
	switch policy := os.Getenv("CONTENT_POLICY"); policy {
	case "", "shared":
		testsuite.ContentSuite(t, "cdtwist", storeFn(t, conn))
		testsuite.ContentCrossNSSharedSuite(t, "cdtwist", storeFn(t, conn))
	case "isolated":
		testsuite.ContentCrossNSIsolatedSuite(t, "cdtwist", storeFn(t, conn))
	default:
		t.Fatalf("unknown CONTENT_POLICY %q", policy)
	}
}
