package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// lostEpochs returns, for each restart, the epochs nnguard's resume lost
// (attempt_start.lost_epochs) and the epoch it resumed at.
func resumes(evs []event) (lost, at []int, from []string) {
	for _, e := range filter(evs, "attempt_start") {
		if num(e["attempt"]) == 1 {
			continue
		}
		lost = append(lost, num(e["lost_epochs"]))
		at = append(at, num(e["resume_epoch"]))
		f, _ := e["resume_from"].(string)
		from = append(from, f)
	}
	return
}

// TestCrashAfterBestResumesFromBest: nnU-Net's schedule (latest every 50
// epochs) and a crash at epoch 70. Plain --c would resume from latest
// (epoch 50: 20 epochs lost); nnguard resumes from the newer best.
func TestCrashAfterBestResumesFromBest(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "80"
	knobs["NNGUARD_SIM_EPOCH_SECONDS"] = "0.005"
	knobs["NNGUARD_SIM_SAVE_EVERY"] = "50"
	knobs["NNGUARD_SIM_CRASH_AT_EPOCH"] = "70"
	knobs["NNGUARD_SIM_ONCE_FILE"] = filepath.Join(t.TempDir(), "once.json")
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	lost, at, from := resumes(evs)
	if len(lost) != 1 {
		t.Fatalf("want one restart, got %v\n%s", lost, out)
	}
	// the newest best before the crash: the last "Yayy!" epoch of attempt 1
	best, epoch, done := -1, -1, -1
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "Traceback") {
			break
		}
		if i := strings.Index(line, ": Epoch "); i >= 0 {
			fmt.Sscan(strings.TrimSpace(line[i+len(": Epoch "):]), &epoch)
		}
		if strings.Contains(line, "Yayy! New best") {
			best = epoch
		}
		if strings.Contains(line, ": Epoch time:") {
			done = epoch
		}
	}
	if best < 50 || at[0] != best+1 || lost[0] != done-best || from[0] != "checkpoint_latest.pth" {
		t.Fatalf("resumed from %s at epoch %d losing %d epochs; want best (epoch %d) promoted into latest", from[0], at[0], lost[0], best)
	}
	moved := filter(evs, "checkpoint_moved")
	if len(moved) == 0 || !strings.Contains(moved[0]["to"].(string), "older-than-best") {
		t.Fatalf("latest was not moved aside: %v", moved)
	}
	// nothing deleted: the older latest (epoch 50) is still there, and backups exist
	matches, _ := filepath.Glob(filepath.Join(tr.fold(), "checkpoint_latest.pth.older-than-best-*"))
	if len(matches) != 1 {
		t.Fatalf("moved-aside latest missing: %v", matches)
	}
	backups, _ := os.ReadDir(filepath.Join(tr.fold(), "nnguard", "checkpoint-backups"))
	if len(backups) == 0 {
		t.Fatal("no checkpoint backups kept")
	}
	t.Logf("crash after epoch %d with latest saved after epoch 49: plain --c loses %d epochs, nnguard lost %d (resumed at %d from best)", done, done+1-50, lost[0], at[0])
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

// TestTruncatedLatestMovedAsideResumesFromBest: a kill during the save of
// checkpoint_latest.pth leaves a truncated zip; nnU-Net's --c would pick it
// and fail on every restart. nnguard moves it aside and resumes from best.
func TestTruncatedLatestMovedAsideResumesFromBest(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "8"
	knobs["NNGUARD_SIM_TRUNCATE_CHECKPOINT_AT_EPOCH"] = "3"
	knobs["NNGUARD_SIM_ONCE_FILE"] = filepath.Join(t.TempDir(), "once.json")
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	var corrupt []event
	for _, m := range filter(evs, "checkpoint_moved") {
		if strings.Contains(m["to"].(string), ".corrupt-") {
			corrupt = append(corrupt, m)
		}
	}
	if len(corrupt) != 1 || !strings.HasSuffix(corrupt[0]["from"].(string), "checkpoint_latest.pth") {
		t.Fatalf("truncated latest not moved aside: %v\n%s", filter(evs, "checkpoint_moved"), out)
	}
	if _, err := os.Stat(corrupt[0]["to"].(string)); err != nil {
		t.Fatalf("the corrupt file must be kept: %v", err)
	}
	if strings.Contains(out, "PytorchStreamReader failed") {
		t.Fatal("the trainer was allowed to load the truncated checkpoint")
	}
	ends := filter(evs, "attempt_end")
	if ends[0]["signal"] != "SIGKILL" {
		t.Fatalf("first attempt: %v", ends[0])
	}
	_, at, _ := resumes(evs)
	if len(at) == 0 || at[0] < 3 {
		t.Fatalf("resumed at %v, want the best checkpoint's epoch (≥ 3)", at)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

func TestStallInTrainingIsDetectedAndResumed(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_EPOCHS"] = "8"
	knobs["NNGUARD_SIM_STALL_AT_EPOCH"] = "4"
	knobs["NNGUARD_SIM_ONCE_FILE"] = filepath.Join(t.TempDir(), "once.json")
	start := time.Now()
	code, out := runNN(t, tr, knobs, "--stall-timeout", "3s", "--first-epoch-timeout", "20s", "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	st := filter(evs, "stall")
	if len(st) != 1 || num(st[0]["epoch"]) != 4 {
		t.Fatalf("stall events %v", st)
	}
	if f := filter(evs, "failure"); len(f) != 1 || f[0]["class"] != "stall" {
		t.Fatalf("failure %v", f)
	}
	if a := filter(evs, "action"); a[0]["kind"] != "restart" {
		t.Fatalf("action %v", a)
	}
	_, at, _ := resumes(evs)
	if len(at) != 1 || at[0] < 3 {
		t.Fatalf("resumed at %v", at)
	}
	if d := time.Since(start); d > 90*time.Second {
		t.Fatalf("took %s", d)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

func TestStallInValidationRerunsValidationOnly(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_VAL_CASES"] = "4"
	knobs["NNGUARD_SIM_STALL_IN_VALIDATION"] = "2"
	knobs["NNGUARD_SIM_ONCE_FILE"] = filepath.Join(t.TempDir(), "once.json")
	code, out := runNN(t, tr, knobs, "--stall-timeout", "3s", "--first-epoch-timeout", "20s", "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	st := filter(evs, "stall")
	if len(st) != 1 || !strings.Contains(st[0]["reason"].(string), "final validation") {
		t.Fatalf("stall events %v", st)
	}
	starts := filter(evs, "attempt_start")
	if len(starts) != 2 {
		t.Fatalf("attempts %d", len(starts))
	}
	second := argvOf(starts[1])
	if !strings.Contains(second, "--val") || strings.Contains(second, "--c") {
		t.Fatalf("second attempt must rerun only the validation: %q", second)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

func TestFinalWithoutSummaryRerunsValidationOnly(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	if code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0", "--npz"); code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	// the validation did not finish: no summary (as after a kill during it)
	if err := os.Remove(filepath.Join(tr.fold(), "validation", "summary.json")); err != nil {
		t.Fatal(err)
	}
	final := readFile(t, filepath.Join(tr.fold(), "checkpoint_final.pth"))
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0", "--npz")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	starts := filter(evs, "attempt_start")
	last := argvOf(starts[len(starts)-1])
	if !strings.Contains(last, "--val") || !strings.Contains(last, "--npz") || strings.Contains(last, "--c") {
		t.Fatalf("want --val --npz without --c, got %q", last)
	}
	if strings.Contains(out, "Epoch 0") {
		t.Fatal("training ran again")
	}
	if string(readFile(t, filepath.Join(tr.fold(), "checkpoint_final.pth"))) != string(final) {
		t.Fatal("checkpoint_final.pth changed")
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

// TestFreshStartInFolderWithCheckpointsKeepsCopies: the user trained with
// nnUNetv2_train directly, it crashed, and now runs nnguard without --c.
// nnU-Net would overwrite checkpoint_best.pth after one epoch; nnguard keeps
// copies first and passes -pretrained_weights through on the first attempt.
func TestFreshStartInFolderWithCheckpointsKeepsCopies(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_CRASH_AT_EPOCH"] = "3"
	direct := execCommand("python3", repoPath(t, "sim/nnunetv2_train.py"), "4", "3d_fullres", "0")
	direct.Env = tr.env(knobs)
	if out, err := direct.CombinedOutput(); err == nil {
		t.Fatalf("the direct run should have crashed:\n%s", out)
	}
	best := readFile(t, filepath.Join(tr.fold(), "checkpoint_best.pth"))
	weights := filepath.Join(t.TempDir(), "pretrained.pth")
	os.WriteFile(weights, best, 0o644)
	delete(knobs, "NNGUARD_SIM_CRASH_AT_EPOCH")
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0", "-pretrained_weights", weights)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	b := filter(evs, "checkpoint_backup")
	if len(b) != 1 {
		t.Fatalf("no backup before the fresh start: %v", b)
	}
	saved := readFile(t, filepath.Join(b[0]["dir"].(string), "checkpoint_best.pth"))
	if string(saved) != string(best) {
		t.Fatal("the backup of checkpoint_best.pth differs from the original")
	}
	first := argvOf(filter(evs, "attempt_start")[0])
	if !strings.Contains(first, "-pretrained_weights "+weights) || strings.Contains(first, "--c") {
		t.Fatalf("first attempt argv %q", first)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

// TestUserContinueOnFreshFoldWithOldNNUNet: nnU-Net 2.0/2.1 crash on --c
// without a checkpoint; nnguard passes --c only when there is one, even
// when the user typed it.
func TestUserContinueOnFreshFoldWithOldNNUNet(t *testing.T) {
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["NNGUARD_SIM_VERSION"] = "2.0"
	code, out := runNN(t, tr, knobs, "4", "3d_fullres", "0", "--c")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	first := argvOf(filter(readEvents(t, tr.fold()), "attempt_start")[0])
	if strings.Contains(first, "--c") {
		t.Fatalf("--c passed with no checkpoint: %q", first)
	}
	assertComplete(t, tr)
}
