package supervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/creack/pty"
)

// Spec is one trainer process to run.
type Spec struct {
	Argv []string
	Env  []string // full environment (os.Environ() plus overrides)
	Dir  string
	// Output receives the raw bytes the trainer writes to its terminal.
	Output io.Writer
}

// Exit is how a process ended.
type Exit struct {
	Code   int    // exit status, -1 when killed by a signal
	Signal string // "SIGKILL", ... when killed by a signal
	Number int    // the signal's number when killed by a signal
}

func (e Exit) String() string {
	if e.Signal != "" {
		return "killed by " + e.Signal
	}
	return "exit status " + strconv.Itoa(e.Code)
}

// Proc is a trainer running under a pty in its own session (pgid == pid).
type Proc struct {
	cmd   *exec.Cmd
	ptmx  *os.File
	pgid  int
	start time.Time

	exited  chan struct{} // closed when the leader has been waited for
	done    chan struct{} // closed when output is drained and the group is gone
	exit    Exit
	err     error
	stuck   []int // group members alive even after SIGKILL
	escaped []int // processes outside the group that held the terminal
}

// WindowSize is the fixed terminal size the trainer sees.
var WindowSize = pty.Winsize{Rows: 50, Cols: 200}

// Start launches spec under a new pty. The process is a session leader, so
// its process group holds every worker it forks; Stop signals the group.
func Start(spec Spec) (*Proc, error) {
	if len(spec.Argv) == 0 {
		return nil, errors.New("supervisor: empty trainer command")
	}
	cmd := exec.Command(spec.Argv[0], spec.Argv[1:]...)
	cmd.Env = spec.Env
	cmd.Dir = spec.Dir
	ws := WindowSize
	ptmx, err := pty.StartWithSize(cmd, &ws)
	if err != nil {
		return nil, fmt.Errorf("supervisor: start %s: %w", spec.Argv[0], err)
	}
	p := &Proc{cmd: cmd, ptmx: ptmx, pgid: cmd.Process.Pid, start: time.Now(),
		exited: make(chan struct{}), done: make(chan struct{})}
	out := spec.Output
	if out == nil {
		out = io.Discard
	}
	ptsNum, _ := ptyNumber(ptmx)
	drained := make(chan struct{})
	go func() { // the one reader of the pty
		defer close(drained)
		buf := make([]byte, 64<<10)
		for {
			n, err := ptmx.Read(buf)
			if n > 0 {
				out.Write(buf[:n])
			}
			if err != nil { // EIO once every holder of the slave side is gone
				return
			}
		}
	}()
	go func() {
		werr := cmd.Wait()
		p.exit = exitOf(cmd.ProcessState)
		var ee *exec.ExitError
		if werr != nil && !errors.As(werr, &ee) {
			p.err = werr
		}
		close(p.exited)
		// Workers outlive their leader (nnU-Net's daemon workers survive a
		// killed main process): end the group, then let the output drain.
		p.stuck = killGroup(p.pgid, 5*time.Second, groupKillBound)
		select {
		case <-drained:
		case <-time.After(drainWait):
			// A descendant that left the process group (setsid) still holds
			// the trainer's terminal: it belongs to this attempt, end it.
			if ptsNum >= 0 {
				p.escaped = terminalHolders(ptsNum)
				for _, pid := range p.escaped {
					syscall.Kill(pid, syscall.SIGTERM)
				}
				select {
				case <-drained:
				case <-time.After(drainWait):
					for _, pid := range p.escaped {
						syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			select {
			case <-drained:
			case <-time.After(drainWait):
				ptmx.SetReadDeadline(time.Now()) // stop waiting for the terminal
				<-drained
			}
		}
		ptmx.Close()
		close(p.done)
	}()
	return p, nil
}

// drainWait is how long the output may take to drain once the group is
// gone; groupKillBound bounds the wait for processes that ignore SIGKILL
// (uninterruptible sleep in a driver).
const (
	drainWait      = 2 * time.Second
	groupKillBound = 20 * time.Second
)

// Leftovers reports processes that outlived the attempt: group members
// that did not die even after SIGKILL (stuck in the kernel) and processes
// outside the group that held the trainer's terminal (and were killed).
func (p *Proc) Leftovers() (stuck, escaped []int) { <-p.done; return p.stuck, p.escaped }

// Pid is the trainer's pid, which is also its process group id.
func (p *Proc) Pid() int { return p.pgid }

// Exited is closed when the trainer's main process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Done is closed when the attempt is over: the main process exited, no
// process of its group is left and its output has been drained.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exit returns how the main process ended; valid after Done.
func (p *Proc) Exit() (Exit, error) { <-p.done; return p.exit, p.err }

// Stop ends the whole process group: SIGTERM, then SIGKILL after grace, and
// waits until the attempt is Done. ctx bounds the wait.
func (p *Proc) Stop(ctx context.Context, grace time.Duration) error {
	signalGroup(p.pgid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
		signalGroup(p.pgid, syscall.SIGKILL)
	case <-ctx.Done():
		signalGroup(p.pgid, syscall.SIGKILL)
	}
	<-p.done
	return nil
}

// Kill sends SIGKILL to the whole group at once.
func (p *Proc) Kill() { signalGroup(p.pgid, syscall.SIGKILL) }

func exitOf(ps *os.ProcessState) Exit {
	if ps == nil {
		return Exit{Code: -1}
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return Exit{Code: -1, Signal: signalName(ws.Signal()), Number: int(ws.Signal())}
	}
	return Exit{Code: ps.ExitCode()}
}

func signalName(s syscall.Signal) string {
	switch s {
	case syscall.SIGKILL:
		return "SIGKILL"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGSEGV:
		return "SIGSEGV"
	case syscall.SIGABRT:
		return "SIGABRT"
	case syscall.SIGBUS:
		return "SIGBUS"
	case syscall.SIGHUP:
		return "SIGHUP"
	}
	return "signal " + strconv.Itoa(int(s))
}

// signalGroup signals every process of the group; ESRCH means already gone.
func signalGroup(pgid int, sig syscall.Signal) {
	if pgid <= 1 {
		return
	}
	_ = syscall.Kill(-pgid, sig)
}

// killGroup ends whatever is left of a group whose leader has exited:
// SIGTERM, then SIGKILL after grace, then waits until no live process of
// the group remains, at most bound after the SIGKILL; it returns the pids
// still alive then. Zombies that nnguard adopted as subreaper are reaped.
func killGroup(pgid int, grace, bound time.Duration) []int {
	if len(GroupMembers(pgid)) == 0 {
		return nil
	}
	signalGroup(pgid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	var killedAt time.Time
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for range tick.C {
		reapGroup(pgid)
		left := GroupMembers(pgid)
		if len(left) == 0 {
			return nil
		}
		switch {
		case killedAt.IsZero() && time.Now().After(deadline):
			signalGroup(pgid, syscall.SIGKILL)
			killedAt = time.Now()
		case !killedAt.IsZero() && time.Since(killedAt) > bound:
			return left
		}
	}
	return nil
}

// GroupMembers lists the live (non-zombie) processes whose process group is
// pgid, read from /proc.
func GroupMembers(pgid int) []int {
	var out []int
	forEachProc(func(pid, ppid, pg int, state byte) {
		if pg == pgid && state != 'Z' && state != 'X' {
			out = append(out, pid)
		}
	})
	return out
}

// reapGroup waits for zombies of the group that are our children (orphaned
// workers re-parented to nnguard, the child subreaper).
func reapGroup(pgid int) {
	me := os.Getpid()
	forEachProc(func(pid, ppid, pg int, state byte) {
		if pg == pgid && ppid == me && state == 'Z' && pid != pgid {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
	})
}

// forEachProc calls fn for every process in /proc with its parent, process
// group and state.
func forEachProc(fn func(pid, ppid, pgid int, state byte)) {
	forEachStat(func(pid int, st procStat) { fn(pid, st.ppid, st.pgid, st.state) })
}

// forEachStat calls fn for every process in /proc with its parsed stat.
func forEachStat(fn func(pid int, st procStat)) {
	d, err := os.Open("/proc")
	if err != nil {
		return
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		st, ok := readStat(pid)
		if !ok {
			continue
		}
		fn(pid, st)
	}
}

type procStat struct {
	state      byte
	ppid, pgid int
	cpuTicks   uint64 // utime + stime
}

func readStat(pid int) (procStat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return procStat{}, false
	}
	f := strings.Fields(s[i+2:])
	// f[0]=state f[1]=ppid f[2]=pgrp ... f[11]=utime f[12]=stime
	if len(f) < 13 {
		return procStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	pg, _ := strconv.Atoi(f[2])
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	stt, _ := strconv.ParseUint(f[12], 10, 64)
	return procStat{state: f[0][0], ppid: ppid, pgid: pg, cpuTicks: ut + stt}, true
}

// GroupCPUTicks sums the CPU time (clock ticks) of the group's live processes.
func GroupCPUTicks(pgid int) uint64 {
	var sum uint64
	forEachStat(func(pid int, st procStat) {
		if st.pgid == pgid {
			sum += st.cpuTicks
		}
	})
	return sum
}

// BecomeSubreaper makes orphaned descendants re-parent to this process, so
// the supervisor can reap the workers a dead trainer leaves behind.
func BecomeSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, e := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); e != 0 {
		return fmt.Errorf("supervisor: prctl(PR_SET_CHILD_SUBREAPER): %w", e)
	}
	return nil
}

// ptyNumber returns N of the pty's slave /dev/pts/N (ioctl TIOCGPTN). It
// goes through SyscallConn: File.Fd would switch the pty to blocking mode
// and break read deadlines.
func ptyNumber(ptmx *os.File) (int, error) {
	const tiocgptn = 0x80045430
	rc, err := ptmx.SyscallConn()
	if err != nil {
		return -1, err
	}
	var n uint32
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, tiocgptn, uintptr(unsafe.Pointer(&n)))
	}); err != nil {
		return -1, err
	}
	if errno != 0 {
		return -1, errno
	}
	return int(n), nil
}

// terminalHolders lists the processes with a file descriptor open on
// /dev/pts/n, nnguard itself excepted.
func terminalHolders(n int) []int {
	target := "/dev/pts/" + strconv.Itoa(n)
	me := os.Getpid()
	var out []int
	forEachProc(func(pid, ppid, pgid int, state byte) {
		if pid == me || state == 'Z' {
			return
		}
		dir := "/proc/" + strconv.Itoa(pid) + "/fd"
		fds, err := os.ReadDir(dir)
		if err != nil {
			return
		}
		for _, fd := range fds {
			if l, err := os.Readlink(dir + "/" + fd.Name()); err == nil && l == target {
				out = append(out, pid)
				return
			}
		}
	})
	return out
}

// FoldMarker is the environment variable nnguard sets for the trainer: its
// value is the fold folder, so that a later nnguard can find trainer
// processes an earlier, killed nnguard left behind.
const FoldMarker = "NNGUARD_FOLD_DIR"

// MarkedProcesses lists live processes whose environment carries
// FoldMarker=foldDir, nnguard itself excepted.
func MarkedProcesses(foldDir string) []int {
	needle := []byte(FoldMarker + "=" + foldDir + "\x00")
	me := os.Getpid()
	var out []int
	forEachProc(func(pid, ppid, pgid int, state byte) {
		if pid == me || state == 'Z' || state == 'X' {
			return
		}
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
		if err == nil && bytes.Contains(b, needle) {
			out = append(out, pid)
		}
	})
	return out
}

// StopProcesses sends SIGTERM to pids, SIGKILL after grace to those still
// alive, and returns the ones that survived even that (bounded wait).
func StopProcesses(pids []int, grace time.Duration) []int {
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGTERM)
	}
	alive := func() []int {
		var out []int
		for _, p := range pids {
			if st, ok := readStat(p); ok && st.state != 'Z' && st.state != 'X' {
				out = append(out, p)
			}
		}
		return out
	}
	deadline := time.Now().Add(grace)
	killed := false
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for range tick.C {
		left := alive()
		if len(left) == 0 {
			return nil
		}
		if !killed && time.Now().After(deadline) {
			for _, p := range left {
				syscall.Kill(p, syscall.SIGKILL)
			}
			killed = true
			deadline = time.Now().Add(groupKillBound)
		} else if killed && time.Now().After(deadline) {
			return left
		}
	}
	return nil
}
