package policy

import (
	"strings"
	"testing"

	lp "github.com/nnguard/nnguard/logparse"
)

func TestDecide(t *testing.T) {
	lim := Limits{MaxRestarts: 10, MinBatchSize: 2, MinWorkers: 1}
	base := Settings{BatchSize: 12, NProcDA: 12}
	diag := func(c lp.Class) lp.Diagnosis { return lp.Diagnosis{Class: c, Reason: "r"} }
	tests := []struct {
		name     string
		in       Input
		kind     Kind
		next     Settings
		contains string
	}{
		{name: "oom halves batch size", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: base, Limits: lim}, kind: LowerBatchSize, next: Settings{BatchSize: 6, NProcDA: 12}},
		{name: "oom halving stops at floor", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: Settings{BatchSize: 3, NProcDA: 12}, Limits: lim}, kind: LowerBatchSize, next: Settings{BatchSize: 2, NProcDA: 12}},
		{name: "oom at floor gives up with advice", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: Settings{BatchSize: 2, NProcDA: 12}, Limits: lim}, kind: GiveUp, contains: "-gpu_memory_target"},
		{name: "oom min 1 allowed", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: Settings{BatchSize: 2, NProcDA: 12}, Limits: Limits{MaxRestarts: 10, MinBatchSize: 1, MinWorkers: 1}}, kind: LowerBatchSize, next: Settings{BatchSize: 1, NProcDA: 12}},
		{name: "fragmented oom sets allocator first", in: Input{Diagnosis: lp.Diagnosis{Class: lp.GPUOOM, ReservedUnallocated: true}, Settings: base, Limits: lim}, kind: SetAllocator, next: Settings{BatchSize: 12, NProcDA: 12, ExpandableSegments: true}},
		{name: "fragmented oom after allocator lowers batch", in: Input{Diagnosis: lp.Diagnosis{Class: lp.GPUOOM, ReservedUnallocated: true}, Settings: Settings{BatchSize: 12, NProcDA: 12, ExpandableSegments: true}, Limits: lim}, kind: LowerBatchSize},
		{name: "fragmented oom user alloc conf untouched", in: Input{Diagnosis: lp.Diagnosis{Class: lp.GPUOOM, ReservedUnallocated: true}, Settings: base, Limits: Limits{MaxRestarts: 10, MinBatchSize: 2, MinWorkers: 1, UserAllocConf: true}}, kind: LowerBatchSize},
		{name: "oom with foreign memory waits", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: base, Limits: lim, GPU: GPUFacts{Known: true, TotalBytes: 24 << 30, ForeignBytes: 8 << 30}}, kind: WaitForGPU, next: base},
		{name: "oom with foreign memory and a free GPU moves", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: base, Limits: lim, GPU: GPUFacts{Known: true, TotalBytes: 24 << 30, ForeignBytes: 8 << 30, FreeOther: 1, HasFreeOther: true}}, kind: MoveGPU, next: base, contains: "GPU 1 is free"},
		{name: "oom after waiting lowers batch", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: base, Limits: lim, WaitedForGPU: true, GPU: GPUFacts{Known: true, TotalBytes: 24 << 30, ForeignBytes: 8 << 30}}, kind: LowerBatchSize},
		{name: "oom small foreign share is ours", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: base, Limits: lim, GPU: GPUFacts{Known: true, TotalBytes: 24 << 30, ForeignBytes: 100 << 20}}, kind: LowerBatchSize},
		{name: "oom in validation reruns validation, batch untouched", in: Input{Diagnosis: lp.Diagnosis{Class: lp.GPUOOM, InValidation: true}, Settings: base, Limits: lim}, kind: RerunValidation, next: Settings{BatchSize: 12, NProcDA: 12, ValidationOnly: true, ExpandableSegments: true}},
		{name: "oom in validation twice gives up", in: Input{Diagnosis: lp.Diagnosis{Class: lp.GPUOOM, InValidation: true}, Settings: Settings{BatchSize: 12, NProcDA: 12, ValidationOnly: true, ExpandableSegments: true}, Limits: lim, Epoch: -1, History: []Record{{Class: lp.GPUOOM, Settings: Settings{BatchSize: 12, NProcDA: 12, ValidationOnly: true, ExpandableSegments: true}, Epoch: -1}}}, kind: GiveUp, contains: "final validation"},
		{name: "gpu fault gives up", in: Input{Diagnosis: diag(lp.GPUFault), Settings: base, Limits: lim, GPU: GPUFacts{FatalXid: 79}}, kind: GiveUp, contains: "Xid 79"},
		{name: "host oom 12 to 6", in: Input{Diagnosis: diag(lp.HostOOM), Settings: base, Limits: lim}, kind: LowerWorkers, next: Settings{BatchSize: 12, NProcDA: 6}},
		{name: "host oom 3 to 1", in: Input{Diagnosis: diag(lp.HostOOM), Settings: Settings{BatchSize: 12, NProcDA: 3}, Limits: lim}, kind: LowerWorkers, next: Settings{BatchSize: 12, NProcDA: 1}},
		{name: "host oom min workers", in: Input{Diagnosis: diag(lp.HostOOM), Settings: Settings{BatchSize: 12, NProcDA: 6}, Limits: Limits{MaxRestarts: 10, MinBatchSize: 2, MinWorkers: 4}}, kind: LowerWorkers, next: Settings{BatchSize: 12, NProcDA: 4}},
		{name: "host oom at floor gives up", in: Input{Diagnosis: diag(lp.HostOOM), Settings: Settings{BatchSize: 12, NProcDA: 1}, Limits: lim}, kind: GiveUp, contains: "host RAM"},
		{name: "shm lowers workers and says shm", in: Input{Diagnosis: diag(lp.ShmExhausted), Settings: base, Limits: lim}, kind: LowerWorkers, contains: "shm-size"},
		{name: "worker error restarts once", in: Input{Diagnosis: diag(lp.WorkerError), Settings: base, Limits: lim}, kind: Restart, next: base},
		{name: "worker error twice gives up naming file", in: Input{Diagnosis: lp.Diagnosis{Class: lp.WorkerError, File: "/d/case_001.npy"}, Settings: base, Limits: lim, History: []Record{{Class: lp.WorkerError, Settings: base, Epoch: 3}}, Epoch: 9}, kind: GiveUp, contains: "case_001.npy"},
		{name: "worker error give-up mentions a full disk", in: Input{Diagnosis: lp.Diagnosis{Class: lp.WorkerError}, Settings: base, Limits: lim, History: []Record{{Class: lp.WorkerError, Settings: base, Epoch: 3}}, Epoch: 9}, kind: GiveUp, contains: "full disk"},
		{name: "unknown restarts", in: Input{Diagnosis: diag(lp.Unknown), Settings: base, Limits: lim}, kind: Restart},
		{name: "unknown twice same settings no progress is a loop", in: Input{Diagnosis: diag(lp.Unknown), Settings: base, Limits: lim, Epoch: 5, History: []Record{{Class: lp.Unknown, Settings: base, Epoch: 5}}}, kind: GiveUp, contains: "crash loop"},
		{name: "unknown twice with progress restarts", in: Input{Diagnosis: diag(lp.Unknown), Settings: base, Limits: lim, Epoch: 9, History: []Record{{Class: lp.Unknown, Settings: base, Epoch: 5}}}, kind: Restart},
		{name: "unknown after other settings restarts", in: Input{Diagnosis: diag(lp.Unknown), Settings: base, Limits: lim, Epoch: 5, History: []Record{{Class: lp.Unknown, Settings: Settings{BatchSize: 24, NProcDA: 12}, Epoch: 5}}}, kind: Restart},
		{name: "max restarts bounds everything", in: Input{Diagnosis: diag(lp.GPUOOM), Settings: base, Limits: lim, Restarts: 10}, kind: GiveUp, contains: "--max-restarts=10"},
		{name: "validation export reruns validation", in: Input{Diagnosis: diag(lp.ValidationExport), Settings: base, Limits: lim}, kind: RerunValidation, next: Settings{BatchSize: 12, NProcDA: 12, DefNProc: 4, ValidationOnly: true}},
		{name: "validation export at 1 gives up", in: Input{Diagnosis: diag(lp.ValidationExport), Settings: Settings{BatchSize: 12, NProcDA: 12, DefNProc: 1, ValidationOnly: true}, Limits: lim}, kind: GiveUp},
		{name: "device assert gives up", in: Input{Diagnosis: lp.Diagnosis{Class: lp.CUDAError, Deterministic: true}, Settings: base, Limits: lim}, kind: GiveUp, contains: "labels"},
		{name: "illegal access restarts once", in: Input{Diagnosis: diag(lp.CUDAError), Settings: base, Limits: lim}, kind: Restart},
		{name: "illegal access twice gives up", in: Input{Diagnosis: diag(lp.CUDAError), Settings: base, Limits: lim, Epoch: 40, History: []Record{{Class: lp.CUDAError, Settings: base, Epoch: 3}}}, kind: GiveUp},
		{name: "compile error disables compile", in: Input{Diagnosis: diag(lp.CompileError), Settings: base, Limits: lim}, kind: DisableCompile, next: Settings{BatchSize: 12, NProcDA: 12, CompileOff: true}},
		{name: "nan stops", in: Input{Diagnosis: diag(lp.NaNLoss), Settings: base, Limits: lim}, kind: GiveUp, contains: "NaN"},
		{name: "disk full gives up", in: Input{Diagnosis: diag(lp.DiskFull), Settings: base, Limits: lim}, kind: GiveUp, contains: "nothing was deleted"},
		{name: "corrupt checkpoint restarts", in: Input{Diagnosis: diag(lp.CorruptCheckpoint), Settings: base, Limits: lim}, kind: Restart},
		{name: "config error gives up", in: Input{Diagnosis: diag(lp.ConfigError), Settings: base, Limits: lim}, kind: GiveUp},
		{name: "stall restarts", in: Input{Diagnosis: diag(lp.Stall), Settings: base, Limits: lim}, kind: Restart},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := Decide(tc.in)
			if d.Kind != tc.kind {
				t.Fatalf("kind %s, want %s (%s)", d.Kind, tc.kind, d.Reason)
			}
			if tc.next != (Settings{}) && d.Next != tc.next {
				t.Fatalf("next %+v, want %+v", d.Next, tc.next)
			}
			if tc.contains != "" && !strings.Contains(d.Reason, tc.contains) {
				t.Fatalf("reason %q lacks %q", d.Reason, tc.contains)
			}
			if d.Reason == "" {
				t.Fatal("no reason")
			}
		})
	}
}

func TestWorkerSequence(t *testing.T) {
	s := Settings{BatchSize: 2, NProcDA: 12}
	var got []int
	for i := 0; i < 10; i++ {
		d := Decide(Input{Diagnosis: lp.Diagnosis{Class: lp.HostOOM}, Settings: s, Limits: Limits{MaxRestarts: 10, MinBatchSize: 2, MinWorkers: 1}})
		if d.Kind == GiveUp {
			break
		}
		s = d.Next
		got = append(got, s.NProcDA)
	}
	if want := []int{6, 3, 1}; len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("sequence %v, want %v", got, want)
	}
}

func TestSettingsEnv(t *testing.T) {
	e := Settings{NProcDA: 3, DefNProc: 2, ExpandableSegments: true, CompileOff: true}.Env()
	if e["nnUNet_n_proc_DA"] != "3" || e["nnUNet_def_n_proc"] != "2" || e["PYTORCH_CUDA_ALLOC_CONF"] != "expandable_segments:True" || e["nnUNet_compile"] != "f" {
		t.Fatalf("%v", e)
	}
}
