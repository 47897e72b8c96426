package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// trainerPIDs returns the trainer's processes (its group) of this tree.
func trainerPIDs(t *testing.T, tr tree) []int {
	t.Helper()
	ps := procsOf(tr)
	if len(ps) == 0 {
		t.Fatal("no trainer process found")
	}
	return ps
}

// TestSchedulerSignalsEveryoneIsAnInterruptNotAFailure: Slurm's scancel or
// preemption signals every process of the job, so the trainer may die of
// SIGTERM before nnguard acts. That is an interruption: no failure, no
// decision, no history entry that a later requeue would count as a crash.
func TestSchedulerSignalsEveryoneIsAnInterruptNotAFailure(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "1000"
	n := start(t, tr, knobs, "4", "3d_fullres", "0")
	n.waitFor("Epoch 2", time.Minute)
	for _, p := range trainerPIDs(t, tr) {
		syscall.Kill(p, syscall.SIGTERM)
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	if code := n.wait(time.Minute); code != 143 {
		t.Fatalf("exit %d\n%s", code, n.output())
	}
	evs := readEvents(t, tr.fold())
	if f := filter(evs, "failure"); len(f) != 0 {
		t.Fatalf("an interruption was recorded as a failure: %v", f)
	}
	var st map[string]any
	json.Unmarshal(readFile(t, filepath.Join(tr.fold(), "nnguard", "state.json")), &st)
	if h, _ := st["history"].([]any); len(h) != 0 {
		t.Fatalf("history %v", h)
	}
	assertNoProcesses(t, tr)
}

// TestSignalDuringGraceKeepsTheLesson: the trainer printed its OOM and hangs;
// nnguard is stopped during the grace. The OOM's decision (a lower batch
// size) must be in state.json so the next run does not repeat it.
func TestSignalDuringGraceKeepsTheLesson(t *testing.T) {
	tr := mkTree(t, 8)
	knobs := smallGPU("1", "NNGUARD_SIM_HANG_AFTER_FATAL", "1")
	n := start(t, tr, knobs, "--grace", "10m", "4", "3d_fullres", "0")
	n.waitFor("printed a fatal error", time.Minute)
	n.cmd.Process.Signal(syscall.SIGTERM)
	if code := n.wait(time.Minute); code != 143 {
		t.Fatalf("exit %d\n%s", code, n.output())
	}
	evs := readEvents(t, tr.fold())
	if a := filter(evs, "action"); len(a) != 1 || a[0]["kind"] != "lower_batch_size" {
		t.Fatalf("actions %v", a)
	}
	var st struct {
		Settings struct {
			BatchSize int `json:"batch_size"`
		} `json:"settings"`
	}
	json.Unmarshal(readFile(t, filepath.Join(tr.fold(), "nnguard", "state.json")), &st)
	if st.Settings.BatchSize != 4 {
		t.Fatalf("state batch size %d, want 4", st.Settings.BatchSize)
	}
	assertNoProcesses(t, tr)
}

// TestUnwritableStdoutStillDiagnoses: nnguard's stdout on a full disk (a
// cluster's .out file) must not blind the parser or console.log.
func TestUnwritableStdoutStillDiagnoses(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full")
	}
	tr := mkTree(t, 8)
	knobs := smallGPU("2")
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Skip(err)
	}
	defer full.Close()
	cmd := exec.Command(nnguardBin, "train", "--trainer-cmd", "python3 "+repoPath(t, "sim/nnunetv2_train.py"), "--backoff", "0s", "4", "3d_fullres", "0")
	cmd.Env = tr.env(knobs)
	cmd.Stdout = full
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v\n%s", err, stderr.String())
	}
	evs := readEvents(t, tr.fold())
	if f := filter(evs, "failure"); len(f) != 1 || f[0]["class"] != "gpu_oom" {
		t.Fatalf("failures %v", f)
	}
	if !strings.Contains(string(readFile(t, filepath.Join(tr.fold(), "nnguard", "console.log"))), "OutOfMemoryError") {
		t.Fatal("console.log lacks the trainer's output")
	}
	assertComplete(t, tr)
}

// TestClosedStdoutPipeDoesNotKillNNGuard: `nnguard train ... | head` must not
// die of SIGPIPE and leave its records half written.
func TestClosedStdoutPipeDoesNotKillNNGuard(t *testing.T) {
	tr := mkTree(t, 2)
	cmd := exec.Command(nnguardBin, "train", "--trainer-cmd", "python3 "+repoPath(t, "sim/nnunetv2_train.py"), "4", "3d_fullres", "0")
	cmd.Env = tr.env(fastSim())
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	buf := make([]byte, 100)
	r.Read(buf) // the first output, then the reader goes away
	r.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("nnguard: %v", err)
	}
	evs := readEvents(t, tr.fold())
	if e := filter(evs, "run_end"); len(e) != 1 || e[0]["outcome"] != "completed" {
		t.Fatalf("run_end %v", e)
	}
}

func TestRefusedOptionsExit2(t *testing.T) {
	tr := mkTree(t, 2)
	for _, args := range [][]string{
		{"4", "3d_fullres", "0", "--disable_checkpointing"},
		{"4", "3d_fullres", "0", "--val"}, // nothing trained yet
	} {
		code, out := runNN(t, tr, fastSim(), args...)
		if code != 2 || len(strings.Split(strings.TrimSpace(out), "\n")) != 1 {
			t.Fatalf("%v: exit %d\n%s", args, code, out)
		}
	}
	if _, err := os.Stat(filepath.Join(tr.fold(), "nnguard")); err == nil {
		t.Fatal("a refused command wrote records")
	}
}

// TestSIGKILLOfNNGuardAloneLeftoversAreStoppedNextRun: only nnguard dies
// (kill -9); the trainer ignores the terminal's hangup, so it and its
// workers live on. The same command again must stop them before starting a
// second trainer on the fold, then continue.
func TestSIGKILLOfNNGuardAloneLeftoversAreStoppedNextRun(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "8"
	// the first trainer goes silent at epoch 2 (once): it is alive, quiet and
	// holding its workers when nnguard dies
	knobs["NNGUARD_SIM_STALL_AT_EPOCH"] = "2"
	knobs["NNGUARD_SIM_ONCE_FILE"] = filepath.Join(t.TempDir(), "once.json")
	// a trainer that ignores SIGHUP (inherited through exec by Python and
	// its forked workers), so the terminal's hangup does not end it
	wrapper := filepath.Join(t.TempDir(), "nohup-trainer.sh")
	os.WriteFile(wrapper, []byte("#!/bin/sh\ntrap '' HUP\nexec python3 "+repoPath(t, "sim/nnunetv2_train.py")+" \"$@\"\n"), 0o755)
	n := start(t, tr, knobs, "--trainer-cmd", wrapper, "4", "3d_fullres", "0")
	n.waitFor("Epoch 2", time.Minute)
	n.cmd.Process.Kill() // nnguard only
	n.wait(time.Minute)
	if len(procsOf(tr)) == 0 {
		t.Fatal("the trainer did not outlive nnguard: the test proves nothing")
	}
	code, out := runNN(t, tr, knobs, "--trainer-cmd", wrapper, "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	if !strings.Contains(out, "outlived its nnguard") {
		t.Fatalf("leftovers not reported:\n%s", out)
	}
	evs := readEvents(t, tr.fold())
	if len(filter(evs, "leftovers_stopped")) != 1 {
		t.Fatal("no leftovers_stopped event")
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}
