// Package policy decides what nnguard does after a failed attempt. Decide is a
// pure function: the diagnosis, the history and the settings in force go in,
// a decision (new settings, wait, rerun the validation or give up, with the
// reason) comes out. No clock, no I/O.
//
// policy imports logparse for the failure classes and the diagnosis type
// only (plain data), so the two packages cannot disagree on class names.
package policy

import (
	"fmt"

	"github.com/nnguard/nnguard/logparse"
)

// Kind is the kind of an action. The names are part of events.jsonl.
type Kind string

const (
	LowerBatchSize  Kind = "lower_batch_size"
	LowerWorkers    Kind = "lower_workers"
	Restart         Kind = "restart"
	GiveUp          Kind = "give_up"
	SetAllocator    Kind = "set_allocator"    // PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
	DisableCompile  Kind = "disable_compile"  // nnUNet_compile=f
	RerunValidation Kind = "rerun_validation" // --val with fewer export processes
	WaitForGPU      Kind = "wait_for_gpu"     // other processes hold the GPU
	MoveGPU         Kind = "move_gpu"         // other processes hold the GPU; another one is free (--gpu auto)
)

// Settings are the knobs nnguard turns between attempts.
type Settings struct {
	BatchSize          int  `json:"batch_size"`
	NProcDA            int  `json:"n_proc_da"`
	DefNProc           int  `json:"def_n_proc,omitempty"` // nnUNet_def_n_proc; 0 = nnU-Net's default (8)
	ExpandableSegments bool `json:"expandable_segments,omitempty"`
	CompileOff         bool `json:"compile_off,omitempty"`
	ValidationOnly     bool `json:"validation_only,omitempty"`
}

// DefaultDefNProc is nnU-Net's default nnUNet_def_n_proc.
const DefaultDefNProc = 8

// Limits bound what the policy may do.
type Limits struct {
	MaxRestarts  int
	MinBatchSize int
	MinWorkers   int
	// UserAllocConf: the user set PYTORCH_CUDA_ALLOC_CONF; leave it alone.
	UserAllocConf bool
	// UserCompile: the user set nnUNet_compile; still turn it off on a
	// compile failure, but say so.
	UserCompile bool
}

// Record is one earlier failure, oldest first in a history.
type Record struct {
	Class    logparse.Class `json:"class"`
	Settings Settings       `json:"settings"`
	Epoch    int            `json:"epoch"` // highest epoch the attempt reached, -1 if none
}

// GPUFacts is what the GPU monitor saw at the failure. Known is false when
// GPU monitoring is off.
type GPUFacts struct {
	Known        bool
	TotalBytes   uint64
	ForeignBytes uint64 // held by processes outside the trainer's tree
	FatalXid     uint64 // a critical Xid code seen during the attempt, 0 if none
	// FreeOther is another visible GPU with enough free memory (only with
	// --gpu auto), valid when HasFreeOther.
	FreeOther    int
	HasFreeOther bool
}

// ContentionShare is the share of the GPU other processes must hold for an
// OOM to count as contention rather than the batch size's fault.
const ContentionShare = 0.10

// Input is everything Decide looks at.
type Input struct {
	Diagnosis logparse.Diagnosis
	Epoch     int      // highest epoch the failed attempt reached, -1 if none
	History   []Record // earlier failures of this run, oldest first
	Settings  Settings
	Limits    Limits
	Restarts  int // restarts done so far in this run
	GPU       GPUFacts
	// WaitedForGPU: the previous action was already a wait for this GPU and
	// the memory was not released in time.
	WaitedForGPU bool
}

// Decision is what to do next.
type Decision struct {
	Kind   Kind           `json:"kind"`
	Class  logparse.Class `json:"class"`
	From   string         `json:"from,omitempty"`
	To     string         `json:"to,omitempty"`
	Next   Settings       `json:"next"`
	Reason string         `json:"reason"`
	// Env are environment overrides the next attempt needs (on top of the
	// ones Settings imply).
	GPUFault bool `json:"gpu_fault,omitempty"`
}

// Decide returns the action after a failed attempt.
func Decide(in Input) Decision {
	d := decide(in)
	if d.Kind != GiveUp && in.Restarts >= in.Limits.MaxRestarts {
		return giveUp(in, fmt.Sprintf("reached --max-restarts=%d (last failure %s: %s)", in.Limits.MaxRestarts, in.Diagnosis.Class, d.Reason))
	}
	return d
}

func giveUp(in Input, reason string) Decision {
	return Decision{Kind: GiveUp, Class: in.Diagnosis.Class, Next: in.Settings, Reason: reason}
}

// repeated reports a crash loop: the previous failure had the same class,
// the same settings, and the trainer made no progress since.
func repeated(in Input) bool {
	if len(in.History) == 0 {
		return false
	}
	last := in.History[len(in.History)-1]
	return last.Class == in.Diagnosis.Class && last.Settings == in.Settings && in.Epoch <= last.Epoch
}

func decide(in Input) Decision {
	s := in.Settings
	c := in.Diagnosis.Class
	why := in.Diagnosis.Reason
	if why == "" {
		why = string(c)
	}
	restart := func(reason string) Decision {
		if repeated(in) {
			return giveUp(in, fmt.Sprintf("crash loop: %s twice in a row with the same settings and no progress (%s)", c, why))
		}
		return Decision{Kind: Restart, Class: c, Next: s, Reason: reason}
	}
	switch c {
	case logparse.None:
		return restart("the trainer exited without finishing and without a recognisable error; resuming")

	case logparse.GPUFault:
		d := giveUp(in, fmt.Sprintf("the GPU reported a critical Xid %d (hardware or driver fault); do not retry on this GPU: requeue the job on another node", in.GPU.FatalXid))
		d.GPUFault = true
		return d

	case logparse.GPUContention, logparse.GPUOOM:
		contended := in.GPU.Known && in.GPU.TotalBytes > 0 && float64(in.GPU.ForeignBytes) >= ContentionShare*float64(in.GPU.TotalBytes)
		if contended && in.GPU.HasFreeOther {
			return Decision{Kind: MoveGPU, Class: logparse.GPUContention, Next: s, To: fmt.Sprint(in.GPU.FreeOther),
				Reason: fmt.Sprintf("other processes hold %d MiB of %d MiB on this GPU; GPU %d is free: restarting there instead of lowering the batch size", in.GPU.ForeignBytes>>20, in.GPU.TotalBytes>>20, in.GPU.FreeOther)}
		}
		if contended && !in.WaitedForGPU {
			return Decision{Kind: WaitForGPU, Class: logparse.GPUContention, Next: s,
				Reason: fmt.Sprintf("other processes hold %d MiB of %d MiB on the GPU; waiting for it instead of lowering the batch size", in.GPU.ForeignBytes>>20, in.GPU.TotalBytes>>20)}
		}
		if in.Diagnosis.InValidation && c == logparse.GPUOOM {
			// The batch size plays no part in the final validation (it
			// predicts case by case with the patch size); the training is done.
			if s.ValidationOnly && repeated(in) {
				return giveUp(in, "CUDA ran out of memory in the final validation again; run it on a GPU with more free memory (nnUNetv2_train ... --val), the trained checkpoint_final.pth is complete")
			}
			n := s
			n.ValidationOnly = true
			if !s.ExpandableSegments && !in.Limits.UserAllocConf {
				n.ExpandableSegments = true
			}
			return Decision{Kind: RerunValidation, Class: c, Next: n,
				Reason: "CUDA ran out of memory in the final validation, not in training: the batch size is not the cause; rerunning only the validation (--val)"}
		}
		if in.Diagnosis.ReservedUnallocated && !s.ExpandableSegments && !in.Limits.UserAllocConf {
			n := s
			n.ExpandableSegments = true
			return Decision{Kind: SetAllocator, Class: c, From: "", To: "expandable_segments:True", Next: n,
				Reason: "a large share of GPU memory was reserved but unallocated (fragmentation); setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before lowering the batch size"}
		}
		if s.BatchSize <= in.Limits.MinBatchSize || s.BatchSize <= 1 {
			return giveUp(in, fmt.Sprintf("CUDA out of memory at batch size %d, the floor (--min-batch-size=%d); next: train a smaller configuration (e.g. 3d_lowres or 2d), replan with nnUNetv2_plan_experiment -gpu_memory_target <GB> on this GPU, or use a GPU with more memory", s.BatchSize, in.Limits.MinBatchSize))
		}
		n := s
		n.BatchSize = max(s.BatchSize/2, in.Limits.MinBatchSize, 1)
		return Decision{Kind: LowerBatchSize, Class: c, From: fmt.Sprint(s.BatchSize), To: fmt.Sprint(n.BatchSize), Next: n,
			Reason: fmt.Sprintf("CUDA out of memory at batch size %d; halving it to %d", s.BatchSize, n.BatchSize)}

	case logparse.HostOOM, logparse.ShmExhausted:
		floor := max(in.Limits.MinWorkers, 0)
		if s.NProcDA <= floor {
			if c == logparse.ShmExhausted {
				return giveUp(in, fmt.Sprintf("/dev/shm is full even with %d data-augmentation workers; enlarge it (docker run --shm-size=8g, or a bigger tmpfs on /dev/shm)", s.NProcDA))
			}
			return giveUp(in, fmt.Sprintf("data-augmentation workers were killed (host memory) even with nnUNet_n_proc_DA=%d (the floor, --min-workers=%d); free host RAM, request more memory from the scheduler, or use a smaller configuration", s.NProcDA, in.Limits.MinWorkers))
		}
		n := s
		n.NProcDA = max(s.NProcDA/2, floor)
		reason := fmt.Sprintf("a data-augmentation worker was killed (most often host RAM); lowering nnUNet_n_proc_DA from %d to %d", s.NProcDA, n.NProcDA)
		if c == logparse.ShmExhausted {
			reason = fmt.Sprintf("/dev/shm ran full while workers passed batches; lowering nnUNet_n_proc_DA from %d to %d (to fix it for good, enlarge /dev/shm, e.g. docker run --shm-size=8g)", s.NProcDA, n.NProcDA)
		}
		return Decision{Kind: LowerWorkers, Class: c, From: fmt.Sprint(s.NProcDA), To: fmt.Sprint(n.NProcDA), Next: n, Reason: reason}

	case logparse.WorkerError:
		for _, h := range in.History {
			if h.Class == logparse.WorkerError {
				return giveUp(in, workerErrorAdvice(in.Diagnosis, "failed again"))
			}
		}
		if repeated(in) {
			return giveUp(in, workerErrorAdvice(in.Diagnosis, "failed again"))
		}
		return Decision{Kind: Restart, Class: c, Next: s, Reason: "a data-augmentation worker raised an exception; restarting once in case it was transient (" + why + ")"}

	case logparse.ValidationExport:
		n := s
		n.ValidationOnly = true
		cur := s.DefNProc
		if cur == 0 {
			cur = DefaultDefNProc
		}
		if cur <= 1 && s.ValidationOnly {
			return giveUp(in, "the final validation's export workers died even with nnUNet_def_n_proc=1; free host RAM or run nnUNetv2_train ... --val on a bigger machine")
		}
		n.DefNProc = max(cur/2, 1)
		return Decision{Kind: RerunValidation, Class: c, From: fmt.Sprint(cur), To: fmt.Sprint(n.DefNProc), Next: n,
			Reason: fmt.Sprintf("the final validation's export workers died (host RAM while resampling); training is complete, rerunning only the validation (--val) with nnUNet_def_n_proc=%d", n.DefNProc)}

	case logparse.CUDAError:
		if in.Diagnosis.Deterministic {
			return giveUp(in, "a CUDA device-side assert fired; this repeats on every restart and usually means label values outside 0..num_classes-1: check the labels (nnUNetv2_plan_and_preprocess --verify_dataset_integrity)")
		}
		for _, h := range in.History {
			if h.Class == logparse.CUDAError {
				return giveUp(in, "a CUDA error happened again after a restart ("+why+"); check the GPU (nvidia-smi, dmesg for Xid) and the driver")
			}
		}
		return Decision{Kind: Restart, Class: c, Next: s, Reason: "a CUDA runtime error (" + why + "); restarting once"}

	case logparse.CompileError:
		if s.CompileOff {
			return restart("torch.compile failed even though nnUNet_compile=f; " + why)
		}
		n := s
		n.CompileOff = true
		reason := "torch.compile / Triton failed to build kernels; restarting with nnUNet_compile=f (slower but reliable)"
		if in.Limits.UserCompile {
			reason += "; this overrides your nnUNet_compile setting"
		}
		return Decision{Kind: DisableCompile, Class: c, From: "", To: "f", Next: n, Reason: reason}

	case logparse.NaNLoss:
		return giveUp(in, "the loss is NaN for several epochs; training cannot recover and would burn the GPU for nothing: check the data (intensities, labels) or lower the learning rate")

	case logparse.DiskFull:
		return giveUp(in, "the disk is full ("+why+"); free space on the results or preprocessed disk (or TMPDIR) and run the same command again: nothing was deleted")

	case logparse.CorruptCheckpoint:
		return restart("a checkpoint could not be read; it is moved aside and training resumes from the previous valid one")

	case logparse.ConfigError:
		return giveUp(in, "configuration error, retrying cannot help: "+why)

	case logparse.Stall:
		return restart("the trainer stopped making progress (" + why + "); stopping it and resuming from the newest checkpoint")

	default: // Unknown and anything new
		return restart("the trainer crashed for an unrecognised reason; restarting unchanged (" + why + ")")
	}
}

func workerErrorAdvice(d logparse.Diagnosis, what string) string {
	s := "a data-augmentation worker " + what + " with an exception (" + d.Reason + ")"
	if d.File != "" {
		s += "; the file " + d.File + " looks corrupt: delete the unpacked copies and re-run nnUNetv2_preprocess (or the unpacking) for it"
	} else {
		s += "; the preprocessed data is probably corrupt: re-run nnUNetv2_plan_and_preprocess (or delete the unpacked .npy files so they are unpacked again)"
	}
	return s + "; truncated files are often left by a full disk (or TMPDIR) during preprocessing or unpacking: check free space first"
}

// Env returns the environment overrides that the settings imply.
func (s Settings) Env() map[string]string {
	env := map[string]string{"nnUNet_n_proc_DA": fmt.Sprint(s.NProcDA)}
	if s.DefNProc > 0 {
		env["nnUNet_def_n_proc"] = fmt.Sprint(s.DefNProc)
	}
	if s.ExpandableSegments {
		env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
	}
	if s.CompileOff {
		env["nnUNet_compile"] = "f"
	}
	return env
}

// Would describes, for `nnguard classify`, what nnguard would do with a
// failure of this diagnosis on a fresh run with typical settings.
func Would(d logparse.Diagnosis) Decision {
	in := Input{
		Diagnosis: d,
		Epoch:     -1,
		Settings:  Settings{BatchSize: 4, NProcDA: 12},
		Limits:    Limits{MaxRestarts: 10, MinBatchSize: 2, MinWorkers: 1},
		GPU:       GPUFacts{},
	}
	if d.Class == logparse.None {
		return Decision{Kind: "none", Class: d.Class, Reason: "no failure found"}
	}
	return Decide(in)
}
