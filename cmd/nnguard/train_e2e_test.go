package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestTrainOOMLowersBatchSizeAndResumes(t *testing.T) {
	tr := mkTree(t, 8)
	plans := filepath.Join(tr.pre, "Dataset004_Hippocampus", "nnUNetPlans.json")
	orig := readFile(t, plans)
	knobs := smallGPU("3")
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
	if string(readFile(t, plans)) != string(orig) {
		t.Fatal("the user's plans file was modified")
	}
	evs := readEvents(t, tr.fold())
	fails := filter(evs, "failure")
	if len(fails) != 1 || fails[0]["class"] != "gpu_oom" {
		t.Fatalf("failures %v", fails)
	}
	acts := filter(evs, "action")
	if len(acts) != 1 || acts[0]["kind"] != "lower_batch_size" || num(acts[0]["from"]) != 8 || num(acts[0]["to"]) != 4 {
		t.Fatalf("actions %v", acts)
	}
	starts := filter(evs, "attempt_start")
	if len(starts) != 2 {
		t.Fatalf("attempts %v", starts)
	}
	second := argvOf(starts[1])
	if !strings.Contains(second, " --c") || !strings.Contains(second, "-p nnUNetPlans__nnguard_") {
		t.Fatalf("second attempt argv %q lacks --c or the derived plans", second)
	}
	if num(starts[1]["batch_size"]) != 4 || num(starts[1]["resume_epoch"]) < 2 {
		t.Fatalf("second attempt %v: want batch 4 resumed from a checkpointed epoch >= 2", starts[1])
	}
	// the trainer really ran with 4 (its printed configuration) and continued
	if !strings.Contains(out, "'batch_size': 4") {
		t.Fatal("trainer never printed batch_size 4")
	}
	bs := filter(evs, "batch_size")
	if len(bs) != 2 || num(bs[1]["effective"]) != 4 {
		t.Fatalf("effective batch size events %v", bs)
	}
	ends := filter(evs, "run_end")
	if len(ends) != 1 || ends[0]["outcome"] != "completed" || num(ends[0]["exit_code"]) != 0 {
		t.Fatalf("run_end %v", ends)
	}
}

func TestTrainDeadWorkersLowerWorkers(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["nnUNet_n_proc_DA"] = "12"
	for k, v := range map[string]string{"NNGUARD_SIM_HOST_MIB": "4096", "NNGUARD_SIM_MAIN_MIB": "800", "NNGUARD_SIM_WORKER_MIB": "300", "NNGUARD_SIM_HOST_OOM_FROM_EPOCH": "1"} {
		knobs[k] = v
	}
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
	evs := readEvents(t, tr.fold())
	acts := filter(evs, "action")
	if len(acts) != 1 || acts[0]["kind"] != "lower_workers" || num(acts[0]["from"]) != 12 || num(acts[0]["to"]) != 6 {
		t.Fatalf("actions %v\n%s", acts, out)
	}
	if f := filter(evs, "failure"); f[0]["class"] != "host_oom" {
		t.Fatalf("failure %v", f)
	}
	starts := filter(evs, "attempt_start")
	if env := starts[1]["env"].(map[string]any); env["nnUNet_n_proc_DA"] != "6" {
		t.Fatalf("second attempt env %v", env)
	}
}

func TestTrainHangAfterOOMIsStoppedAfterGrace(t *testing.T) {
	tr := mkTree(t, 8)
	knobs := smallGPU("2", "NNGUARD_SIM_HANG_AFTER_FATAL", "1")
	code, out := runNN(t, tr, knobs, "--grace", "1s", "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	if len(filter(evs, "grace_expired")) != 1 {
		t.Fatalf("no grace_expired event:\n%s", out)
	}
	ends := filter(evs, "attempt_end")
	if ends[0]["signal"] != "SIGTERM" && ends[0]["signal"] != "SIGKILL" {
		t.Fatalf("first attempt should have been stopped by a signal: %v", ends[0])
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

func TestSIGTERMStopsTrainerAndExits143(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "1000"
	n := start(t, tr, knobs, "4", "3d_fullres", "0")
	n.waitFor("Epoch 2", time.Minute)
	if len(procsOf(tr)) < 3 {
		t.Fatalf("expected the trainer and its workers running, got %v", procsOf(tr))
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	if code := n.wait(time.Minute); code != 143 {
		t.Fatalf("exit %d, want 143\n%s", code, n.output())
	}
	assertNoProcesses(t, tr)
	evs := readEvents(t, tr.fold())
	ends := filter(evs, "run_end")
	if len(ends) != 1 || ends[0]["outcome"] != "interrupted" || num(ends[0]["exit_code"]) != 143 {
		t.Fatalf("run_end %v", ends)
	}
}

func TestSIGKILLThenSameCommandContinuesWithReducedSettings(t *testing.T) {
	tr := mkTree(t, 8)
	knobs := smallGPU("2", "NNGUARD_SIM_EPOCHS", "10")
	n := start(t, tr, knobs, "4", "3d_fullres", "0")
	n.waitFor("lower_batch_size", time.Minute)
	n.waitFor("Epoch 4", time.Minute)
	// SIGKILL nnguard and the trainer's group, as a Slurm preemption would.
	syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
	killLeftovers(tr)
	n.wait(time.Minute)

	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("second run exit %d\n%s", code, out)
	}
	if !strings.Contains(out, "continuing an earlier nnguard run") {
		t.Fatalf("second run did not continue:\n%s", out)
	}
	evs := readEvents(t, tr.fold())
	starts := filter(evs, "attempt_start")
	last := starts[len(starts)-1]
	if num(last["batch_size"]) != 4 || !strings.Contains(argvOf(last), "--c") {
		t.Fatalf("continued attempt %v", last)
	}
	for _, f := range filter(evs, "failure")[1:] {
		if f["class"] == "gpu_oom" && num(f["attempt"]) > 2 {
			t.Fatalf("the continued run hit the OOM again: %v", f)
		}
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

func TestBadInputExits2AndWritesNothing(t *testing.T) {
	tr := mkTree(t, 2)
	snapshot := func() []string {
		var files []string
		filepath.Walk(tr.root, func(p string, info os.FileInfo, err error) error {
			if err == nil {
				files = append(files, p)
			}
			return nil
		})
		return files
	}
	before := snapshot()
	cases := []struct {
		name string
		env  map[string]string
		args []string
		msg  string
	}{
		{"unknown dataset", nil, []string{"7", "3d_fullres", "0"}, "7"},
		{"unknown configuration", nil, []string{"4", "3d_nope", "0"}, "3d_nope"},
		{"bad fold", nil, []string{"4", "3d_fullres", "x"}, "fold"},
		{"missing plans", nil, []string{"4", "3d_fullres", "0", "-p", "NoSuchPlans"}, "NoSuchPlans"},
		{"too few args", nil, []string{"4"}, "usage"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, out := runNN(t, tr, fastSim(), tc.args...)
			if code != 2 {
				t.Fatalf("exit %d, want 2\n%s", code, out)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 1 || !strings.Contains(strings.ToLower(out), strings.ToLower(tc.msg)) {
				t.Fatalf("want one clear line mentioning %q, got:\n%s", tc.msg, out)
			}
		})
	}
	t.Run("unset nnUNet_results", func(t *testing.T) {
		n := &tree{root: tr.root, raw: tr.raw, pre: tr.pre, res: ""}
		env := n.env(fastSim())
		code, out := runEnv(t, env, "4", "3d_fullres", "0")
		if code != 2 || !strings.Contains(out, "nnUNet_results") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
	})
	t.Run("malformed plans", func(t *testing.T) {
		p := filepath.Join(tr.pre, "Dataset004_Hippocampus", "Broken.json")
		os.WriteFile(p, []byte(`{"plans_name": "x", "configurations": {`), 0o644)
		defer os.Remove(p)
		code, out := runNN(t, tr, fastSim(), "4", "3d_fullres", "0", "-p", "Broken")
		if code != 2 || !strings.Contains(out, "Broken") {
			t.Fatalf("exit %d:\n%s", code, out)
		}
	})
	after := snapshot()
	if strings.Join(before, "\n") != strings.Join(after, "\n") {
		t.Fatalf("bad input wrote files:\nbefore %v\nafter %v", before, after)
	}
}

func runEnv(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	var filtered []string
	for _, kv := range env {
		if strings.HasPrefix(kv, "nnUNet_results=") {
			continue
		}
		filtered = append(filtered, kv)
	}
	cmd := execCommand(nnguardBin, append([]string{"train", "--trainer-cmd", "python3 " + repoPath(t, "sim/nnunetv2_train.py")}, args...)...)
	cmd.Env = filtered
	out, _ := cmd.CombinedOutput()
	return cmd.ProcessState.ExitCode(), string(out)
}

func TestAlreadyCompleteExits0WithoutTraining(t *testing.T) {
	tr := mkTree(t, 2)
	code, out := runNN(t, tr, fastSim(), "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := len(readEvents(t, tr.fold()))
	code, out = runNN(t, tr, fastSim(), "4", "3d_fullres", "0")
	if code != 0 || !strings.Contains(out, "already complete") {
		t.Fatalf("exit %d\n%s", code, out)
	}
	if len(readEvents(t, tr.fold())) != evs {
		t.Fatal("a complete fold was trained again")
	}
}

func TestSecondNNGuardOnSameFoldRefuses(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "1000"
	n := start(t, tr, knobs, "4", "3d_fullres", "0")
	n.waitFor("Epoch 1", time.Minute)
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0")
	if code != 2 || !strings.Contains(out, "another nnguard") {
		t.Fatalf("second nnguard: exit %d\n%s", code, out)
	}
	n.cmd.Process.Signal(syscall.SIGINT)
	if code := n.wait(time.Minute); code != 130 {
		t.Fatalf("SIGINT exit %d", code)
	}
	assertNoProcesses(t, tr)
}

func TestUnusableSetupExits2(t *testing.T) {
	tr := mkTree(t, 2)
	t.Run("trainer not found", func(t *testing.T) {
		cmd := execCommand(nnguardBin, "train", "--trainer-cmd", "/nonexistent/nnUNetv2_train", "4", "3d_fullres", "0")
		cmd.Env = tr.env(fastSim())
		out, _ := cmd.CombinedOutput()
		if cmd.ProcessState.ExitCode() != 2 || !strings.Contains(string(out), "not found") {
			t.Fatalf("exit %d\n%s", cmd.ProcessState.ExitCode(), out)
		}
	})
	t.Run("results folder unwritable", func(t *testing.T) {
		// the trainer's folder is a file: nothing can be created below it
		base := filepath.Dir(tr.fold())
		os.MkdirAll(filepath.Dir(base), 0o755)
		if err := os.WriteFile(base, []byte("not a folder"), 0o644); err != nil {
			t.Fatal(err)
		}
		code, out := runNN(t, tr, fastSim(), "4", "3d_fullres", "0")
		if code != 2 || !strings.Contains(out, "nnUNet_results") {
			t.Fatalf("exit %d\n%s", code, out)
		}
		if b, _ := os.ReadFile(base); string(b) != "not a folder" {
			t.Fatal("the file was changed")
		}
	})
}

// TestReadOnlyPlansFolderStillLowersBatchSize: a dataset shared read-only
// (a bind mount here). The derived plans go with the fold's records and -p
// gets their absolute path, which nnU-Net joins onto the dataset folder.
func TestReadOnlyPlansFolderStillLowersBatchSize(t *testing.T) {
	tr := mkTree(t, 8)
	// nnU-Net writes splits_final.json into the dataset folder on the first
	// run: let a first fold do that while it is writable
	if code, out := runNN(t, tr, fastSim(), "4", "3d_fullres", "1"); code != 0 {
		t.Fatalf("fold 1: exit %d\n%s", code, out)
	}
	ds := filepath.Join(tr.pre, "Dataset004_Hippocampus")
	if out, err := exec.Command("mount", "--bind", ds, ds).CombinedOutput(); err != nil {
		t.Skipf("cannot bind-mount: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", ds).Run() })
	if out, err := exec.Command("mount", "-o", "remount,bind,ro", ds).CombinedOutput(); err != nil {
		t.Skipf("cannot make it read-only: %v %s", err, out)
	}
	code, out := runNN(t, tr, smallGPU("2"), "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	starts := filter(evs, "attempt_start")
	last := argvOf(starts[len(starts)-1])
	want := "-p " + filepath.Join(tr.fold(), "nnguard", "plans", "nnUNetPlans__nnguard_3d_fullres_f0_bs4")
	if !strings.Contains(last, want) || num(starts[len(starts)-1]["batch_size"]) != 4 {
		t.Fatalf("last attempt %q, want %q", last, want)
	}
	assertComplete(t, tr)
}

// TestPlansInAnotherFolder: -p may name a plans file outside the dataset
// folder (nnU-Net joins it onto the dataset folder); the derived plans sit
// next to it and -p keeps the folder.
func TestPlansInAnotherFolder(t *testing.T) {
	tr := mkTree(t, 8)
	lab := filepath.Join(tr.root, "labplans")
	os.MkdirAll(lab, 0o755)
	orig := readFile(t, filepath.Join(tr.pre, "Dataset004_Hippocampus", "nnUNetPlans.json"))
	os.WriteFile(filepath.Join(lab, "Lab.json"), orig, 0o644)
	code, out := runNN(t, tr, smallGPU("2"), "4", "3d_fullres", "0", "-p", "../../labplans/Lab")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(lab, "Lab__nnguard_3d_fullres_f0_bs4.json")); err != nil {
		t.Fatal(err)
	}
	starts := filter(readEvents(t, tr.fold()), "attempt_start")
	if last := argvOf(starts[len(starts)-1]); !strings.Contains(last, "-p ../../labplans/Lab__nnguard_3d_fullres_f0_bs4") {
		t.Fatalf("argv %q", last)
	}
	if string(readFile(t, filepath.Join(lab, "Lab.json"))) != string(orig) {
		t.Fatal("the user's plans changed")
	}
	assertComplete(t, tr)
}
