package supervisor

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The test binary impersonates the trainer (the os/exec helper-process
// pattern): NNGUARD_TEST_HELPER selects the behaviour.
func TestMain(m *testing.M) {
	if mode := os.Getenv("NNGUARD_TEST_HELPER"); mode != "" {
		helper(mode)
		return
	}
	if err := BecomeSubreaper(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	os.Exit(m.Run())
}

func blockForever() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGUSR1)
	<-c
}

func helper(mode string) {
	switch mode {
	case "print-exit":
		for i := 0; i < 3; i++ {
			fmt.Printf("line %d\n", i)
		}
		fmt.Print("last line without newline")
		os.Exit(3)
	case "ignore-term":
		signal.Ignore(syscall.SIGTERM)
		fmt.Printf("grandchild %d ready\n", os.Getpid())
		blockForever()
	case "escape":
		c := exec.Command(os.Args[0])
		c.Env = append(os.Environ(), "NNGUARD_TEST_HELPER=ignore-term")
		c.Stdout = os.Stdout
		c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := c.Start(); err != nil {
			fmt.Println("start:", err)
			os.Exit(1)
		}
		fmt.Printf("escaped %d\n", c.Process.Pid)
		os.Exit(0)
	case "tree-ignore-term", "orphan":
		signal.Ignore(syscall.SIGTERM)
		c := exec.Command(os.Args[0])
		c.Env = append(os.Environ(), "NNGUARD_TEST_HELPER=ignore-term")
		c.Stdout = os.Stdout
		c.Stderr = os.Stderr
		if err := c.Start(); err != nil {
			fmt.Println("start:", err)
			os.Exit(1)
		}
		fmt.Printf("child %d started\n", c.Process.Pid)
		if mode == "orphan" {
			// Wait for the grandchild's ready line through the shared pty?
			// The leader cannot see it; it exits and leaves the orphan.
			os.Exit(0)
		}
		blockForever()
	}
	os.Exit(0)
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
	ch chan struct{}
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.b.Write(p)
	select {
	case s.ch <- struct{}{}:
	default:
	}
	return n, err
}

func (s *syncBuf) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// waitFor blocks until the output contains want, bounded by the test deadline.
func (s *syncBuf) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for !strings.Contains(s.String(), want) {
		select {
		case <-s.ch:
		case <-deadline:
			t.Fatalf("timeout waiting for %q; output so far:\n%s", want, s.String())
		}
	}
}

func start(t *testing.T, mode string) (*Proc, *syncBuf) {
	t.Helper()
	out := &syncBuf{ch: make(chan struct{}, 1)}
	p, err := Start(Spec{Argv: []string{os.Args[0]}, Env: append(os.Environ(), "NNGUARD_TEST_HELPER="+mode), Output: out})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		select {
		case <-p.Done():
		case <-time.After(20 * time.Second):
			t.Error("process group not gone after cleanup")
		}
	})
	return p, out
}

func assertGroupGone(t *testing.T, pgid int) {
	t.Helper()
	// zombies may linger until their parent reaps them; they hold nothing
	if m := GroupMembers(pgid); len(m) != 0 {
		t.Fatalf("processes left in group %d: %v", pgid, m)
	}
}

func TestOutputUntilEIOAndExitCode(t *testing.T) {
	p, out := start(t, "print-exit")
	ex, err := p.Exit()
	if err != nil {
		t.Fatal(err)
	}
	if ex.Code != 3 || ex.Signal != "" {
		t.Fatalf("exit %+v", ex)
	}
	s := out.String()
	if !strings.Contains(s, "line 0\r\nline 1\r\nline 2\r\n") || !strings.HasSuffix(s, "last line without newline") {
		t.Fatalf("output %q", s)
	}
	assertGroupGone(t, p.Pid())
}

func TestStopKillsGrandchildrenThatIgnoreTERM(t *testing.T) {
	p, out := start(t, "tree-ignore-term")
	out.waitFor(t, "ready")
	if n := len(GroupMembers(p.Pid())); n != 2 {
		t.Fatalf("want 2 processes in the group, got %d", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.Stop(ctx, 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	ex, _ := p.Exit()
	if ex.Signal != "SIGKILL" {
		t.Fatalf("leader ignored TERM, so it must end by SIGKILL: %+v", ex)
	}
	assertGroupGone(t, p.Pid())
}

func TestOrphanedWorkerIsKilledAfterLeaderExit(t *testing.T) {
	p, out := start(t, "orphan")
	<-p.Exited()
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("attempt never done; output:\n%s", out.String())
	}
	ex, _ := p.Exit()
	if ex.Code != 0 {
		t.Fatalf("exit %+v", ex)
	}
	assertGroupGone(t, p.Pid())
}

func TestStartMissingProgram(t *testing.T) {
	_, err := Start(Spec{Argv: []string{"/nonexistent/nnUNetv2_train"}, Env: os.Environ()})
	if err == nil {
		t.Fatal("expected an error")
	}
}

func TestEscapedTerminalHolderIsEndedAndOutputDrains(t *testing.T) {
	// a descendant leaves the process group (setsid) but keeps the terminal
	p, out := start(t, "escape")
	out.waitFor(t, "escaped")
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("attempt never done while an escaped process holds the terminal")
	}
	_, escaped := p.Leftovers()
	if len(escaped) != 1 {
		t.Fatalf("escaped holders %v", escaped)
	}
	// The test binary is the subreaper: the escaped process is its child
	// now; waiting for it proves it was killed (bounded by the test timeout).
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(escaped[0], &ws, 0, nil); err != nil {
		t.Fatalf("wait for escaped process %d: %v", escaped[0], err)
	}
	if !ws.Signaled() {
		t.Fatalf("escaped process ended with %v, want killed", ws)
	}
}
