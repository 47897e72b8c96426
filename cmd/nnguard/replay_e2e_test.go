package main

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
)

// mainExit reads how the real trainer's main process ended from the
// nnunet-cpu corpus' .events file ("main exited rc=N" or "rc=-15").
var reMainExit = regexp.MustCompile(`main exited .*rc=(-?\d+)`)

func mainExit(t *testing.T, events string) (int, bool) {
	f, err := os.Open(events)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := reMainExit.FindStringSubmatch(sc.Text()); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n, true
		}
	}
	return 0, false
}

// TestReplayRealLogsThroughThePty: the real trainer's console logs of
// ../shared/corpus/nnunet-cpu, replayed through nnguard's pty with the real
// exit status, get the root cause the logs show.
func TestReplayRealLogsThroughThePty(t *testing.T) {
	dir := filepath.Join(corpusDir(t), "nnunet-cpu")
	cases := map[string]string{
		"c_fake_oom":                    "gpu_oom",
		"c2_fake_oom_bg0.25.1":          "gpu_oom",
		"c3_fake_oom_repeat":            "gpu_oom",
		"b_kill_train_worker":           "host_oom",
		"b2_kill_val_worker":            "host_oom",
		"b3_kill_train_worker_bg0.25.1": "host_oom",
		"b4_kill_export_pool_worker_during_final_validation": "validation_export",
	}
	replay := repoPath(t, "cmd/nnguard/testdata/replay.py")
	for name, want := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			rc, ok := mainExit(t, filepath.Join(dir, name+".events"))
			if !ok {
				t.Fatalf("no exit status in %s.events", name)
			}
			tr := mkTree(t, 2)
			code, out := runNN(t, tr, fastSim(), "--trainer-cmd", "python3 "+replay+" "+filepath.Join(dir, name+".log")+" "+strconv.Itoa(rc),
				"--max-restarts", "0", "4", "3d_fullres", "0")
			if code != 3 {
				t.Fatalf("exit %d, want 3 (gave up at --max-restarts 0)\n%s", code, out)
			}
			f := filter(readEvents(t, tr.fold()), "failure")
			if len(f) != 1 || f[0]["class"] != want {
				t.Fatalf("failure %v, want %s", f, want)
			}
		})
	}
}
