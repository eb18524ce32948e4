// Interop peer for cdtwist's ttrpc (tests/test_ttrpc_interop.py).
//
// It uses github.com/containerd/ttrpc and the containerd API packages from
// /usr/share/gocode (GOPATH mode) and implements the same small contract
// as tests/test_ttrpc_protocol.py's TaskImpl, so every check runs in both
// directions:
//
//	ttrpcinterop server <socket>          serve until stdin closes; prints READY
//	ttrpcinterop client <socket> <check>  run one check; prints ok or the failure
//
// Contract (containerd.task.v2.Task and containerd.services.events.ttrpc.v1.Events):
//
//	State("echo:x")        -> {id, exec_id=namespace, bundle=metadata, stdin="deadline"|"none"}
//	State("len:...")       -> {id="len", pid=len(id)}
//	State("error:C:M")     -> status C, message M
//	State("notfound:x")    -> NOT_FOUND "x: not found"
//	State("boom")          -> plain error "boom" (UNKNOWN)
//	State("none")          -> nil response (UNKNOWN "ttrpc: marshal called with nil")
//	State("sleep:MS[:t]")  -> {id} after MS milliseconds, or the context error
//	State("big:N")         -> {id="big", bundle=N bytes}
//	State("lastevent")     -> {id=topic, exec_id=namespace, stdout=event value, bundle=type_url}
//	Pids(id)               -> processes [{pid=len(id)}, {pid=7}]
//	Events.Forward(env)    -> Empty, remembered for State("lastevent")
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	events "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	taskapi "github.com/containerd/containerd/api/types/task"
	task "github.com/containerd/containerd/runtime/v2/task"
	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	taskService    = "containerd.task.v2.Task"
	namespaceKey   = "containerd-namespace-ttrpc"
	messageMax     = 4 << 20
	oversizeSuffix = " exceed maximum message size of 4194304"
)

// ---------------------------------------------------------------- server

type impl struct {
	mu   sync.Mutex
	last *events.Envelope
}

func metadataString(ctx context.Context) string {
	md, ok := ttrpc.GetMetadata(ctx)
	if !ok {
		return ""
	}
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+strings.Join(md[k], ","))
	}
	return strings.Join(parts, ";")
}

func (s *impl) State(ctx context.Context, req *task.StateRequest) (*task.StateResponse, error) {
	cmd, arg, _ := strings.Cut(req.ID, ":")
	switch cmd {
	case "echo":
		ns, _ := ttrpc.GetMetadataValue(ctx, namespaceKey)
		deadline := "none"
		if _, ok := ctx.Deadline(); ok {
			deadline = "deadline"
		}
		return &task.StateResponse{ID: req.ID, ExecID: ns, Bundle: metadataString(ctx), Stdin: deadline}, nil
	case "len":
		return &task.StateResponse{ID: "len", Pid: uint32(len(req.ID))}, nil
	case "error":
		c, msg, _ := strings.Cut(arg, ":")
		code, _ := strconv.Atoi(c)
		return nil, status.Errorf(codes.Code(code), "%s", msg)
	case "notfound":
		return nil, status.Errorf(codes.NotFound, "%s: not found", arg)
	case "boom":
		return nil, errors.New("boom")
	case "none":
		return nil, nil
	case "sleep":
		ms, _, _ := strings.Cut(arg, ":")
		n, _ := strconv.Atoi(ms)
		select {
		case <-time.After(time.Duration(n) * time.Millisecond):
			return &task.StateResponse{ID: req.ID}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	case "big":
		n, _ := strconv.Atoi(arg)
		return &task.StateResponse{ID: "big", Bundle: strings.Repeat("x", n)}, nil
	case "lastevent":
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.last == nil {
			return nil, status.Errorf(codes.NotFound, "no event: not found")
		}
		resp := &task.StateResponse{ID: s.last.Topic, ExecID: s.last.Namespace}
		if s.last.Event != nil {
			resp.Stdout = string(s.last.Event.Value)
			resp.Bundle = s.last.Event.TypeUrl
		}
		return resp, nil
	}
	return nil, status.Errorf(codes.InvalidArgument, "unknown command %q", cmd)
}

func (s *impl) Pids(ctx context.Context, req *task.PidsRequest) (*task.PidsResponse, error) {
	return &task.PidsResponse{Processes: []*taskapi.ProcessInfo{{Pid: uint32(len(req.ID))}, {Pid: 7}}}, nil
}

func (s *impl) Forward(ctx context.Context, req *events.ForwardRequest) (*types.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last = req.Envelope
	return &types.Empty{}, nil
}

func serve(path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	srv, err := ttrpc.NewServer(ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()))
	if err != nil {
		return err
	}
	s := &impl{}
	srv.Register(taskService, map[string]ttrpc.Method{
		"State": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req task.StateRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return s.State(ctx, &req)
		},
		"Pids": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req task.PidsRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return s.Pids(ctx, &req)
		},
	})
	events.RegisterEventsService(srv, s)
	go func() {
		// The parent holds our stdin: when it goes away, so do we.
		bufio.NewReader(os.Stdin).ReadString('\n')
		srv.Close()
		os.Remove(path)
		os.Exit(0)
	}()
	fmt.Println("READY")
	return srv.Serve(context.Background(), l)
}

// ---------------------------------------------------------------- client

func state(ctx context.Context, c *ttrpc.Client, id string) (*task.StateResponse, error) {
	return task.NewTaskClient(c).State(ctx, &task.StateRequest{ID: id})
}

func expectStatus(err error, code codes.Code, message string) error {
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("want status %v %q, got %v (%T)", code, message, err, err)
	}
	if st.Code() != code || st.Message() != message {
		return fmt.Errorf("want status %v %q, got %v %q", code, message, st.Code(), st.Message())
	}
	return nil
}

func requestSize(id string) int {
	payload, _ := proto.Marshal(&task.StateRequest{ID: id})
	b, _ := proto.Marshal(&ttrpc.Request{Service: taskService, Method: "State", Payload: payload})
	return len(b)
}

// idForFrame pads a "len:" id until the Request frame body is exactly size bytes.
func idForFrame(size int) string {
	n := size - 64
	for requestSize("len:"+strings.Repeat("x", n)) < size {
		n++
	}
	id := "len:" + strings.Repeat("x", n)
	if requestSize(id) != size {
		panic(fmt.Sprintf("cannot build a %d byte request", size))
	}
	return id
}

func echoWorks(ctx context.Context, c *ttrpc.Client) error {
	resp, err := state(ctx, c, "echo:after")
	if err != nil || resp.ID != "echo:after" {
		return fmt.Errorf("connection unusable afterwards: %v %v", resp, err)
	}
	return nil
}

var checks = map[string]func(ctx context.Context, c *ttrpc.Client) error{
	"unary": func(ctx context.Context, c *ttrpc.Client) error {
		resp, err := state(ctx, c, "echo:hi")
		if err != nil {
			return err
		}
		if resp.ID != "echo:hi" || resp.Stdin != "none" || resp.ExecID != "" || resp.Bundle != "" {
			return fmt.Errorf("echo: %+v", resp)
		}
		pids, err := task.NewTaskClient(c).Pids(ctx, &task.PidsRequest{ID: "abc"})
		if err != nil {
			return err
		}
		if len(pids.Processes) != 2 || pids.Processes[0].Pid != 3 || pids.Processes[1].Pid != 7 {
			return fmt.Errorf("pids: %+v", pids)
		}
		return nil
	},
	"errors": func(ctx context.Context, c *ttrpc.Client) error {
		cases := []struct {
			id   string
			code codes.Code
			msg  string
		}{
			{"error:5:gone away", codes.NotFound, "gone away"},
			{"error:9:not: yet", codes.FailedPrecondition, "not: yet"},
			{"error:8:too much", codes.ResourceExhausted, "too much"},
			{"notfound:c1", codes.NotFound, "c1: not found"},
			{"boom", codes.Unknown, "boom"},
			{"none", codes.Unknown, "ttrpc: marshal called with nil"},
		}
		for _, tc := range cases {
			_, err := state(ctx, c, tc.id)
			if err := expectStatus(err, tc.code, tc.msg); err != nil {
				return fmt.Errorf("%s: %w", tc.id, err)
			}
		}
		var resp task.StateResponse
		err := c.Call(ctx, "nope.Svc", "State", &task.StateRequest{}, &resp)
		if err := expectStatus(err, codes.Unimplemented, "service nope.Svc"); err != nil {
			return err
		}
		err = c.Call(ctx, taskService, "Nope", &task.StateRequest{}, &resp)
		return expectStatus(err, codes.Unimplemented, "method Nope")
	},
	"metadata": func(ctx context.Context, c *ttrpc.Client) error {
		md := ttrpc.MD{}
		md.Append("Foo", "a", "b")
		md.Set(namespaceKey, "ns1")
		resp, err := state(ttrpc.WithMetadata(ctx, md), c, "echo:md")
		if err != nil {
			return err
		}
		if resp.ExecID != "ns1" || resp.Bundle != "containerd-namespace-ttrpc=ns1;foo=a,b" {
			return fmt.Errorf("metadata: %+v", resp)
		}
		return nil
	},
	"limit": func(ctx context.Context, c *ttrpc.Client) error {
		id := idForFrame(messageMax)
		resp, err := state(ctx, c, id)
		if err != nil {
			return fmt.Errorf("at the limit: %w", err)
		}
		if resp.Pid != uint32(len(id)) {
			return fmt.Errorf("at the limit: pid %d, want %d", resp.Pid, len(id))
		}
		_, err = state(ctx, c, idForFrame(messageMax+1))
		if err := expectStatus(err, codes.ResourceExhausted, "message length 4194305"+oversizeSuffix); err != nil {
			return fmt.Errorf("over the limit: %w", err)
		}
		return echoWorks(ctx, c)
	},
	"bigresponse": func(ctx context.Context, c *ttrpc.Client) error {
		_, err := state(ctx, c, "big:5000000")
		st, ok := status.FromError(err)
		if !ok || st.Code() != codes.ResourceExhausted ||
			!strings.HasPrefix(st.Message(), "message length 50000") || !strings.HasSuffix(st.Message(), oversizeSuffix) {
			return fmt.Errorf("big response: %v", err)
		}
		resp, err := state(ctx, c, "big:4000000")
		if err != nil || len(resp.Bundle) != 4000000 {
			return fmt.Errorf("4 MB response: %v", err)
		}
		return echoWorks(ctx, c)
	},
	"concurrent": func(ctx context.Context, c *ttrpc.Client) error {
		var wg sync.WaitGroup
		errs := make(chan error, 100)
		for i := 0; i < 100; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				id := fmt.Sprintf("sleep:%d:%d", (i*7)%20, i)
				resp, err := state(ctx, c, id)
				if err == nil && resp.ID != id {
					err = fmt.Errorf("call %d got %q", i, resp.ID)
				}
				if err != nil {
					errs <- err
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			return err
		}
		return nil
	},
	"timeout": func(ctx context.Context, c *ttrpc.Client) error {
		tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := state(tctx, c, "sleep:5000")
		// Either our context fires first, or the server's (from timeout_nano) and it answers
		// DEADLINE_EXCEEDED; a Go server races the same way.
		if !errors.Is(err, context.DeadlineExceeded) &&
			expectStatus(err, codes.DeadlineExceeded, "context deadline exceeded") != nil {
			return fmt.Errorf("want deadline exceeded, got %v", err)
		}
		if time.Since(start) > 2*time.Second {
			return fmt.Errorf("timeout took %v", time.Since(start))
		}
		lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
		defer lcancel()
		resp, err := state(lctx, c, "echo:t")
		if err != nil || resp.Stdin != "deadline" {
			return fmt.Errorf("timeout_nano not seen by the server: %+v %v", resp, err)
		}
		return nil
	},
	"events": func(ctx context.Context, c *ttrpc.Client) error {
		env := &events.Envelope{
			Timestamp: time.Unix(1700000000, 5).UTC(),
			Namespace: "ns1",
			Topic:     "/tasks/exit",
			Event:     &types.Any{TypeUrl: "containerd.events.TaskExit", Value: []byte("payload")},
		}
		if _, err := events.NewEventsClient(c).Forward(ctx, &events.ForwardRequest{Envelope: env}); err != nil {
			return err
		}
		resp, err := state(ctx, c, "lastevent")
		if err != nil {
			return err
		}
		if resp.ID != "/tasks/exit" || resp.ExecID != "ns1" || resp.Stdout != "payload" ||
			resp.Bundle != "containerd.events.TaskExit" {
			return fmt.Errorf("event: %+v", resp)
		}
		return nil
	},
}

func runClient(path, name string) error {
	check, ok := checks[name]
	if !ok {
		return fmt.Errorf("no check %q", name)
	}
	conn, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	// No overall deadline: it would travel as timeout_nano, and checks look at that.
	// The Python side kills us if we hang.
	return check(context.Background(), c)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: ttrpcinterop server <socket> | client <socket> <check>")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = serve(os.Args[2])
	case "client":
		if len(os.Args) != 4 {
			err = errors.New("client needs <socket> <check>")
		} else {
			err = runClient(os.Args[2], os.Args[3])
		}
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("ok")
}
