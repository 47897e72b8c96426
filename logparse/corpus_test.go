package logparse

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	realCorpus = "../../shared/corpus/real"
	cpuCorpus  = "../../shared/corpus/nnunet-cpu"
)

// labelClass maps the corpus labels (README of corpus/real) to our classes.
var labelClass = map[string]Class{
	"gpu_oom":               GPUOOM,
	"worker_death_host_oom": HostOOM, // per file below when the worker was an export worker
	"worker_death_other":    WorkerError,
	"shm_exhausted":         ShmExhausted,
	"hang":                  None, // a hang prints nothing: the watchdog, not the text, decides
	"cuda_other":            CUDAError,
	"nan_loss":              NaNLoss,
	"disk_full":             DiskFull,
	"bad_checkpoint":        CorruptCheckpoint,
	"config_error":          ConfigError,
}

// fileClass overrides the label mapping for single files, one justification each.
var fileClass = map[string]Class{
	// export workers died in the final validation (root_cause line): that is our validation_export.
	"012-worker-death-host-oom-v2-lowres-validation-export-2182.txt": ValidationExport,
	// root_cause: the main process failed inside torch.compile (inductor/aot_autograd).
	"049-config-error-v2-torch-compile-cluster-bgworkers-2769.txt": CompileError,
	// label other: an I/O error the text never shows (log ends mid-traceback in on_epoch_end).
	"051-other-v1-io-error-after-saving-checkpoint-1254.txt": Unknown,
	// label other: a bug in the CPU fallback of the predictor ("Cannot set version_counter"), not an OOM.
	"053-other-v2-ci-validation-fallback-version-counter-2120.txt": Unknown,
}

// knownExceptions are files whose label cannot be decided from their text.
var knownExceptions = map[string]string{
	// The "requested and 0 written" line of the thread is not in the excerpt;
	// the text is a worker's "mmap length is grea(ter than file size)", the
	// same text as 019/020 (worker_death_other). We say worker_error.
	"041-disk-full-v2-tmpdir-requested-0-written-1768.txt": "worker_error",
}

// readTranscript splits a corpus file into its headers and its transcript.
func readTranscript(t testing.TB, path string) (map[string]string, string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	hdr := map[string]string{}
	s := string(b)
	for {
		i := strings.IndexByte(s, '\n')
		if i < 0 {
			t.Fatalf("%s: no --- line", path)
		}
		l := s[:i]
		s = s[i+1:]
		if strings.TrimRight(l, "\r") == "---" {
			break
		}
		if k, v, ok := strings.Cut(l, ":"); ok {
			hdr[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return hdr, s
}

func TestRealCorpus(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(realCorpus, "*.txt"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no corpus files in %s: %v", realCorpus, err)
	}
	ok, exc := 0, 0
	for _, f := range files {
		name := filepath.Base(f)
		hdr, text := readTranscript(t, f)
		want, has := fileClass[name]
		if !has {
			want, has = labelClass[hdr["label"]]
		}
		if !has {
			t.Errorf("%s: label %q has no mapping", name, hdr["label"])
			continue
		}
		d, err := Classify(strings.NewReader(text))
		if err != nil {
			t.Fatal(err)
		}
		if len(d.Evidence) > maxEvidence {
			t.Errorf("%s: %d evidence lines", name, len(d.Evidence))
		}
		if d.Class != None && d.Class != Unknown && len(d.Evidence) == 0 && !strings.Contains(d.Reason, "inferred") {
			t.Errorf("%s: %s without evidence", name, d.Class)
		}
		if got, isExc := knownExceptions[name]; isExc {
			exc++
			if string(d.Class) != got {
				t.Errorf("%s: known exception now gives %s (was %s): update the list", name, d.Class, got)
			}
			t.Logf("%-70s %-18s (label %s: known exception)", name, d.Class, hdr["label"])
			continue
		}
		if d.Class != want {
			t.Errorf("%s: got %s, want %s (label %s)\n  reason: %s\n  evidence: %v", name, d.Class, want, hdr["label"], d.Reason, d.Evidence)
			continue
		}
		ok++
		t.Logf("%-70s %-18s ok", name, d.Class)
	}
	t.Logf("corpus score: %d/%d correct, %d known exception(s)", ok, len(files), exc)
	if exc > 2 {
		t.Errorf("too many known exceptions: %d", exc)
	}
}

func classifyFile(t *testing.T, path string) (Diagnosis, []Event) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := NewParser()
	var evs []Event
	s := NewSplitter(DefaultMaxLine, func(l []byte) { evs = append(evs, p.Feed(string(l))...) })
	if _, err := s.Write(mustRead(t, path)); err != nil {
		t.Fatal(err)
	}
	s.Flush()
	d := p.Diagnose(Exit{})
	d2, err := Classify(f)
	if err != nil {
		t.Fatal(err)
	}
	if d2.Class != d.Class || d2.Reason != d.Reason {
		t.Errorf("%s: Classify %s != Feed %s", path, d2.Class, d.Class)
	}
	return d, evs
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func kinds(evs []Event, k EventKind) []Event {
	var out []Event
	for _, e := range evs {
		if e.Kind == k {
			out = append(out, e)
		}
	}
	return out
}

func TestCPUCorpus(t *testing.T) {
	tests := []struct {
		file  string
		want  Class
		fatal bool
		inVal bool
	}{
		{"a_clean.log", None, false, false},
		{"a0_fresh_first_train.log", None, false, false},
		{"a0_fresh_plan_and_preprocess.log", None, false, false},
		{"b_kill_train_worker.log", HostOOM, true, false},
		{"b2_kill_val_worker.log", HostOOM, true, false},
		{"b3_kill_train_worker_bg0.25.1.log", HostOOM, true, false},
		{"b4_kill_export_pool_worker_during_final_validation.log", ValidationExport, true, true},
		{"b5_kill_export_pool_worker_HANG.log", None, false, true}, // a hang: the stack dump is not a crash
		{"c_fake_oom.log", GPUOOM, true, false},
		{"c2_fake_oom_bg0.25.1.log", GPUOOM, true, false},
		{"c3_fake_oom_repeat.log", GPUOOM, true, false},
		{"d1_sigint_main.log", None, false, false}, // an interrupt: no Fatal despite the results_loop noise
		{"d2_sigterm_main.log", None, false, false},
		{"d3_resume_after_sigint.log", None, false, false},
		{"d4_sigint_group.log", None, false, false},
		{"d5_sigkill_main.log", None, false, false},
		{"d6_sigterm_group.log", None, false, false},
		{"e_bs2_resume_same_folder.log", None, false, false},
		{"f_n_proc_DA_0.log", None, false, false},
		{"f_n_proc_DA_1.log", None, false, false},
		{"g_prlimit_as_1400M.log", None, false, false},
		{"g_prlimit_as_1700M.log", HostOOM, true, false},
		{"h1_continue_no_checkpoint.log", None, false, false},
		{"h2_continue_after_final.log", None, false, false},
		{"i_sigterm_main_during_final_validation.log", None, false, true},
		{"x_worker_exception_at_startup.log", WorkerError, true, false},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			d, evs := classifyFile(t, filepath.Join(cpuCorpus, tc.file))
			if d.Class != tc.want {
				t.Errorf("class %s, want %s (%s) %v", d.Class, tc.want, d.Reason, d.Evidence)
			}
			fat := kinds(evs, Fatal)
			if (len(fat) > 0) != tc.fatal || len(fat) > 1 {
				t.Errorf("fatal events %v, want fatal=%v", fat, tc.fatal)
			}
			if len(fat) == 1 && tc.want != None && fat[0].Class != tc.want {
				t.Errorf("fatal class %s, want %s", fat[0].Class, tc.want)
			}
			if d.InValidation != tc.inVal && tc.want != None {
				t.Errorf("InValidation %v, want %v", d.InValidation, tc.inVal)
			}
		})
	}
}

func TestCPUExitStatus(t *testing.T) {
	tests := []struct {
		file string
		exit Exit
		want Class
	}{
		{"a_clean.log", Exit{Known: true}, None},
		{"d5_sigkill_main.log", Exit{Known: true, Signal: "SIGKILL"}, HostOOM},
		{"d2_sigterm_main.log", Exit{Known: true, Signal: "SIGTERM"}, Unknown},
		{"g_prlimit_as_1400M.log", Exit{Known: true, Signal: "SIGSEGV"}, Unknown},
		{"d4_sigint_group.log", Exit{Known: true, Signal: "SIGINT"}, None},
		{"c_fake_oom.log", Exit{Known: true, Code: 1}, GPUOOM},
		{"b_kill_train_worker.log", Exit{Known: true, Code: 1}, HostOOM},
	}
	for _, tc := range tests {
		p := NewParser()
		s := NewSplitter(0, func(l []byte) { p.Feed(string(l)) })
		s.Write(mustRead(t, filepath.Join(cpuCorpus, tc.file)))
		s.Flush()
		if d := p.Diagnose(tc.exit); d.Class != tc.want {
			t.Errorf("%s %+v: %s, want %s (%s)", tc.file, tc.exit, d.Class, tc.want, d.Reason)
		}
	}
}

func TestCleanProgress(t *testing.T) {
	_, evs := classifyFile(t, filepath.Join(cpuCorpus, "a_clean.log"))
	starts := kinds(evs, EpochStart)
	if len(starts) != 6 {
		t.Fatalf("epoch starts %v", starts)
	}
	for i, e := range starts {
		if e.Epoch != i {
			t.Errorf("epoch start %d: %+v", i, e)
		}
	}
	ends := kinds(evs, EpochEnd)
	if len(ends) != 6 || ends[0].Seconds != 1.97 || ends[0].Epoch != 0 || ends[5].Epoch != 5 {
		t.Errorf("epoch ends %+v", ends)
	}
	if bs := kinds(evs, BatchSize); len(bs) != 1 || bs[0].BatchSize != 4 {
		t.Errorf("batch size %+v", bs)
	}
	if len(kinds(evs, TrainingDone)) != 1 {
		t.Error("no Training done.")
	}
	if len(kinds(evs, NewBest)) == 0 {
		t.Error("no NewBest")
	}
	vc := kinds(evs, ValidationCase)
	if len(vc) != 16 || vc[0].Text != "toy_002" {
		t.Errorf("validation cases %d %+v", len(vc), vc[:1])
	}
	if len(kinds(evs, ValidationDone)) != 1 {
		t.Error("no Validation complete")
	}
	_, evs = classifyFile(t, filepath.Join(cpuCorpus, "e_bs2_resume_same_folder.log"))
	if bs := kinds(evs, BatchSize); len(bs) != 1 || bs[0].BatchSize != 2 {
		t.Errorf("bs2 batch size %+v", bs)
	}
	if st := kinds(evs, EpochStart); len(st) == 0 || st[0].Epoch != 2 {
		t.Errorf("resume should start at epoch 2: %+v", st)
	}
}

func TestFatalTimingCPU(t *testing.T) {
	// The Fatal event must come on the OOM line, before the results_loop noise.
	_, evs := classifyFile(t, filepath.Join(cpuCorpus, "c_fake_oom.log"))
	fat := kinds(evs, Fatal)
	if len(fat) != 1 {
		t.Fatalf("fatal %v", fat)
	}
	lines := strings.Split(string(mustRead(t, filepath.Join(cpuCorpus, "c_fake_oom.log"))), "\n")
	if got := lines[fat[0].Line-1]; !strings.HasPrefix(got, "torch.cuda.OutOfMemoryError") {
		t.Errorf("fatal at line %d %q", fat[0].Line, got)
	}
	if fat[0].Epoch != 3 {
		t.Errorf("fatal epoch %d", fat[0].Epoch)
	}
}
