package logparse

import (
	"encoding/binary"
	"strings"
	"unsafe"
)

// sig is what a matched pattern says about the run. Signals up to sigTier1
// name a root cause; the others are context or weak evidence.
type sig uint8

const (
	sigNone sig = iota
	// Root causes (tier 1), see decide for the precedence.
	sigOOM       // CUDA/GPU out of memory
	sigShm       // /dev/shm full in the tensor feeder
	sigCUDADet   // device-side assert: deterministic, bad labels
	sigCUDA      // other CUDA/cuDNN/cuBLAS/driver runtime errors
	sigCompile   // torch.compile / inductor / Triton
	sigDisk      // no space left on a real disk, quota
	sigCkpt      // corrupt checkpoint, plans pickle, unpacked data
	sigConfig    // setup errors: trainer, plans, dataset, env, versions
	sigWorker    // "Exception in background worker N:" / producer frame
	sigHostMem   // MemoryError / Unable to allocate (host RAM)
	sigHostKill  // the kernel or Slurm OOM killer
	sigExport    // nnU-Net's export pool died in the final validation
	sigInterrupt // KeyboardInterrupt: the run was stopped on purpose
	numTier1
	// Weak or secondary evidence.
	sigDead        // "One or more background workers are no longer alive" & co
	sigCrash       // native crash: segfault, abort, core dumped
	sigEnvWarn     // "nnUNet_raw is not defined and nnU-Net ..." warning
	sigUnpackFix   // "Error when checking X.npy ... fixing..."
	sigValFallback // "Prediction on device was unsuccessful ..."
	sigPlotCaught  // "Unable to plot network architecture:" (next OOM is caught)
	// Patterns that need a second look at the line or its context.
	sigEOF         // EOFError / Ran out of input: checkpoint if loading, else secondary
	sigNoSuchFile  // "No such file or directory": config on an exception line
	sigCalledProc  // CalledProcessError: compile error when a compiler is named
	sigKilledWord  // " Killed ": a shell's "12345 Killed  cmd" report
	sigRequested   // "N requested and M written": disk full
	sigAssertTick  // "Assertion `...' failed": CUDA kernel assert when from a .cu file
	sigNotDefined  // "X is not defined": config when it names an nnU-Net variable
	sigDevShm      // "/dev/shm": shm when the line says no space
	sigExcInThread // "Exception in thread": header only
	sigWorkersMany // "Maybe one of your workers crashed"
	sigCCError     // "main.c:12:3: error:", "fatal error:": compile error when gcc-style
	numSig
)

// ctx bits: context patterns, mostly traceback frames.
type ctx uint16

const (
	ctxTraceback  ctx = 1 << iota // "Traceback (most recent call last)"
	ctxDuring                     // a chained traceback follows
	ctxProducer                   // batchgenerators worker producer frame
	ctxLoad                       // torch.load / load_checkpoint / load_pickle
	ctxCompile                    // torch.compile compile-phase frames
	ctxTrainStep                  // train_step / run_iteration
	ctxForward                    // the network's forward/backward
	ctxValidation                 // perform_actual_validation / predictor
	ctxRemote                     // multiprocessing.pool.RemoteTraceback
	ctxAugmenter                  // batchgenerators waiting for a batch (__get_next_item)
	numCtx        = 10
)

// pattern is one fixed string the classifier looks for, case-insensitively.
// prio decides which signal a line stands for when several patterns match
// the same line (the message "unable to write to file </torch_1>: No space
// left on device (28)" is shm, not disk).
type pattern struct {
	s    string
	sig  sig
	prio uint8
	ctx  ctx
	det  bool // with sigCUDA*: deterministic
}

// patterns is the single source of the fixed strings; patterns.txt is
// generated from it (go test -run TestPatternsFile -update) and used by
// `make bench` to compare with grep -F -f. Every string is at least
// minPattern bytes long.
var patterns = []pattern{
	// GPU out of memory (torch allocator, cuBLAS/cuDNN workspace, ROCm, MPS,
	// driver API; "Tried to allocate" survives even garbled transcripts).
	{s: "CUDA out of memory", sig: sigOOM, prio: 90},
	{s: "CUDA error: out of memory", sig: sigOOM, prio: 92},
	{s: "OutOfMemoryError", sig: sigOOM, prio: 90},
	{s: "CUBLAS_STATUS_ALLOC_FAILED", sig: sigOOM, prio: 90},
	{s: "CUDNN_STATUS_ALLOC_FAILED", sig: sigOOM, prio: 90},
	{s: "HIP out of memory", sig: sigOOM, prio: 90},
	{s: "MPS backend out of memory", sig: sigOOM, prio: 90},
	{s: "CUDA_ERROR_OUT_OF_MEMORY", sig: sigOOM, prio: 92},
	{s: "cudaErrorMemoryAllocation", sig: sigOOM, prio: 92},
	{s: "Tried to allocate", sig: sigOOM, prio: 85},

	// Host RAM.
	{s: "DefaultCPUAllocator", sig: sigHostMem, prio: 99},
	{s: "Unable to allocate", sig: sigHostMem, prio: 60},
	{s: "MemoryError", sig: sigHostMem, prio: 55},
	{s: "Cannot allocate memory", sig: sigHostMem, prio: 60},
	{s: "std::bad_alloc", sig: sigHostMem, prio: 60},
	{s: "oom_kill", sig: sigHostKill, prio: 80},
	{s: "oom-kill", sig: sigHostKill, prio: 80},
	{s: "OOM Killed", sig: sigHostKill, prio: 80},
	{s: "out-of-memory handler", sig: sigHostKill, prio: 80},
	{s: "Out of memory: Killed process", sig: sigHostKill, prio: 95},
	{s: "Memory cgroup out of memory", sig: sigHostKill, prio: 95},
	{s: "exceeded memory limit", sig: sigHostKill, prio: 80},
	{s: "killed by signal: Killed", sig: sigHostKill, prio: 80},
	{s: "terminated with signal SIGKILL", sig: sigHostKill, prio: 80},            // torch.multiprocessing.spawn (DDP)
	{s: "paging file is too small", sig: sigHostMem, prio: 60},                   // Windows [WinError 1455]
	{s: "Not enough storage is available to process", sig: sigHostMem, prio: 60}, // Windows [WinError 8]
	{s: " Killed ", sig: sigKilledWord, prio: 20},

	// Shared memory (torch passes tensors between processes through /dev/shm).
	{s: "</torch_", sig: sigShm, prio: 97},
	{s: "insufficient shared memory", sig: sigShm, prio: 97},
	{s: "out of shared memory", sig: sigShm, prio: 97},
	{s: "/dev/shm", sig: sigDevShm, prio: 96},

	// Disk.
	{s: "No space left on device", sig: sigDisk, prio: 70},
	{s: "Errno 28", sig: sigDisk, prio: 70},
	{s: "requested and ", sig: sigRequested, prio: 72},
	{s: "Disk quota exceeded", sig: sigDisk, prio: 72},
	{s: "Errno 122", sig: sigDisk, prio: 72},

	// CUDA runtime errors other than OOM.
	{s: "device-side assert triggered", sig: sigCUDADet, prio: 86, det: true},
	{s: "Assertion `", sig: sigAssertTick, prio: 84},
	{s: "illegal memory access", sig: sigCUDA, prio: 80},
	{s: "CUDNN_STATUS_EXECUTION_FAILED", sig: sigCUDA, prio: 80},
	{s: "CUBLAS_STATUS_EXECUTION_FAILED", sig: sigCUDA, prio: 80},
	{s: "CUDNN_STATUS_INTERNAL_ERROR", sig: sigCUDA, prio: 80},
	{s: "CUBLAS_STATUS_INTERNAL_ERROR", sig: sigCUDA, prio: 80},
	{s: "CUDNN_STATUS_MAPPING_ERROR", sig: sigCUDA, prio: 80},
	{s: "CUDNN_STATUS_", sig: sigCUDA, prio: 35}, // any other cuDNN status (BAD_PARAM, NOT_SUPPORTED, ...)
	{s: "CUBLAS_STATUS_", sig: sigCUDA, prio: 35},
	{s: "misaligned address", sig: sigCUDA, prio: 80},
	{s: "illegal instruction", sig: sigCUDA, prio: 78},
	{s: "unspecified launch failure", sig: sigCUDA, prio: 80},
	{s: "NVRM: Xid", sig: sigCUDA, prio: 80},
	{s: "Xid (PCI:", sig: sigCUDA, prio: 80},
	{s: "fallen off the bus", sig: sigCUDA, prio: 80},
	{s: "uncorrectable ECC error", sig: sigCUDA, prio: 80},
	{s: "cuda runtime error", sig: sigCUDA, prio: 40},
	{s: "THCudaCheck FAIL", sig: sigCUDA, prio: 40},
	{s: "CUDA error:", sig: sigCUDA, prio: 30},
	{s: "CUDA_ERROR_", sig: sigCUDA, prio: 30},
	{s: "NCCL error", sig: sigCUDA, prio: 30},
	{s: "collective operation timeout", sig: sigCUDA, prio: 30}, // NCCL watchdog (DDP)

	// GPU setup problems are configuration, not runtime faults.
	{s: "no kernel image is available", sig: sigConfig, prio: 88},
	{s: "CUDA driver version is insufficient", sig: sigConfig, prio: 88},
	{s: "Found no NVIDIA driver", sig: sigConfig, prio: 88},
	{s: "No CUDA GPUs are available", sig: sigConfig, prio: 88},
	{s: "Torch not compiled with CUDA enabled", sig: sigConfig, prio: 88},
	{s: "invalid device ordinal", sig: sigConfig, prio: 88},

	// torch.compile / inductor / Triton.
	{s: "torch._dynamo.exc.", sig: sigCompile, prio: 75},
	{s: "torch._inductor.exc.", sig: sigCompile, prio: 75},
	{s: "InductorError", sig: sigCompile, prio: 75},
	{s: "BackendCompilerFailed", sig: sigCompile, prio: 75},
	{s: "triton.compiler.errors", sig: sigCompile, prio: 75},
	{s: "triton.runtime.errors", sig: sigCompile, prio: 75},
	{s: "CompilationError", sig: sigCompile, prio: 70},
	{s: "CppCompileError", sig: sigCompile, prio: 75},
	{s: "InvalidCxxCompiler", sig: sigCompile, prio: 75},
	{s: "LoweringException", sig: sigCompile, prio: 75},
	{s: "TritonMissing", sig: sigCompile, prio: 75},
	{s: "Cannot find a working triton installation", sig: sigCompile, prio: 75},
	{s: "No module named 'triton'", sig: sigCompile, prio: 85},
	{s: "Python.h: No such file", sig: sigCompile, prio: 85},
	{s: "libcuda.so cannot found", sig: sigCompile, prio: 75},
	{s: "cannot find -lcuda", sig: sigCompile, prio: 75},
	{s: "Failed to run autotuning", sig: sigCompile, prio: 74},
	{s: "Failed to find C compiler", sig: sigCompile, prio: 75},
	{s: "Dynamo is not supported", sig: sigCompile, prio: 75},
	{s: "compilation terminated", sig: sigCompile, prio: 70},
	{s: "main.c:", sig: sigCCError, prio: 66},
	{s: "fatal error:", sig: sigCCError, prio: 66},
	{s: "CalledProcessError", sig: sigCalledProc, prio: 60},

	// Corrupt checkpoint / pickle / unpacked data read by the main process.
	{s: "PytorchStreamReader failed", sig: sigCkpt, prio: 80},
	{s: "failed finding central directory", sig: sigCkpt, prio: 80},
	{s: "invalid load key", sig: sigCkpt, prio: 80},
	{s: "UnpicklingError", sig: sigCkpt, prio: 60},
	{s: "Unable to fix unpacking", sig: sigCkpt, prio: 80},
	{s: "Ran out of input", sig: sigEOF, prio: 56},
	{s: "EOFError", sig: sigEOF, prio: 55},
	{s: "Error when checking", sig: sigUnpackFix, prio: 40},

	// Configuration / setup.
	{s: "Could not find requested nnunet trainer", sig: sigConfig, prio: 80},
	{s: "Could not find trainer class", sig: sigConfig, prio: 80},
	{s: "Could not find a dataset with the ID", sig: sigConfig, prio: 80},
	{s: "Could not find a task with the ID", sig: sigConfig, prio: 80},
	{s: "not found in plans", sig: sigConfig, prio: 80},
	{s: "Cannot run validation because the training is not finished", sig: sigConfig, prio: 80},
	{s: "Weights only load failed", sig: sigConfig, prio: 85},
	{s: "Cannot both continue a training AND load pretrained weights", sig: sigConfig, prio: 80},
	{s: "Cannot set --c and --val", sig: sigConfig, prio: 80},
	{s: "dataset_name_or_id must either be", sig: sigConfig, prio: 80},
	{s: "Unable to convert given value for fold", sig: sigConfig, prio: 80},
	{s: "is not compatible with --disable_checkpointing", sig: sigConfig, prio: 80},
	{s: "Error(s) in loading state_dict", sig: sigConfig, prio: 80},
	{s: "Cannot run DDP if the batch size", sig: sigConfig, prio: 80},
	{s: "_train: error:", sig: sigConfig, prio: 80},
	{s: "ModuleNotFoundError", sig: sigConfig, prio: 65},
	{s: "ImportError", sig: sigConfig, prio: 65},
	{s: "FileNotFoundError", sig: sigConfig, prio: 65},
	{s: "No such file or directory", sig: sigNoSuchFile, prio: 45},
	{s: "is not defined and nnU-Net", sig: sigEnvWarn, prio: 70},
	{s: "is not defined", sig: sigNotDefined, prio: 62},

	// Dead workers and export pool.
	{s: "Exception in background worker", sig: sigWorker, prio: 70},
	{s: "One or more background workers are no longer alive", sig: sigDead, prio: 50},
	{s: "Some background workers are no longer alive", sig: sigExport, prio: 55},
	{s: "Abort event was set", sig: sigDead, prio: 50},
	{s: "abort_event was set", sig: sigDead, prio: 50},
	{s: "Maybe one of your workers crashed", sig: sigWorkersMany, prio: 49},
	{s: "background worker is 6 feet under", sig: sigDead, prio: 50},
	{s: "(results_loop)", sig: sigDead, prio: 45},
	{s: "exited unexpectedly", sig: sigDead, prio: 45},
	{s: "Exception in thread", sig: sigExcInThread, prio: 10},

	// Others.
	{s: "KeyboardInterrupt", sig: sigInterrupt, prio: 58},
	{s: "Segmentation fault", sig: sigCrash, prio: 35},
	{s: "core dumped", sig: sigCrash, prio: 35},
	{s: "Fatal Python error", sig: sigCrash, prio: 35},
	{s: "terminate called after throwing", sig: sigCrash, prio: 25},
	{s: "Prediction on device was unsuccessful", sig: sigValFallback, prio: 40},
	{s: "Unable to plot network architecture", sig: sigPlotCaught, prio: 40},

	// Context: traceback structure and frames.
	{s: "Traceback (most recent call last)", ctx: ctxTraceback},
	{s: "During handling of the above exception", ctx: ctxDuring},
	{s: "The above exception was the direct cause", ctx: ctxDuring},
	{s: ", in producer", ctx: ctxProducer},
	{s: "RemoteTraceback", ctx: ctxRemote},
	{s: "torch.load", ctx: ctxLoad},
	{s: "load_checkpoint", ctx: ctxLoad},
	{s: "load_pickle", ctx: ctxLoad},
	{s: "pickle.load", ctx: ctxLoad},
	{s: "serialization.py", ctx: ctxLoad},
	{s: "call_user_compiler", ctx: ctxCompile},
	{s: ", in compile_fx", ctx: ctxCompile},
	{s: "aot_module_simplified", ctx: ctxCompile},
	{s: "create_aot_dispatcher_function", ctx: ctxCompile},
	{s: "compile_to_module", ctx: ctxCompile},
	{s: "fw_compiler_base", ctx: ctxCompile},
	{s: "convert_frame", ctx: ctxCompile},
	{s: "compile_subgraph", ctx: ctxCompile},
	{s: "train_step", ctx: ctxTrainStep},
	{s: "run_iteration", ctx: ctxTrainStep},
	{s: "self.network(", ctx: ctxForward},
	{s: "forward_call", ctx: ctxForward},
	{s: ".backward(", ctx: ctxForward},
	{s: "network_architecture", ctx: ctxForward},
	{s: "_call_impl", ctx: ctxForward},
	{s: "perform_actual_validation", ctx: ctxValidation},
	{s: "predict_sliding_window", ctx: ctxValidation},
	{s: "export_prediction", ctx: ctxValidation},
	{s: "__get_next_item", ctx: ctxAugmenter},
}

// The matcher samples one 4-byte window every matchStride bytes of a line,
// case-folds it (OR 0x20 per byte), hashes it into a 64 Ki-bit filter and
// only on a hit looks up the (pattern, offset) pairs that produced that
// window. Every pattern is at least matchStride+3 bytes long, so each
// occurrence covers one sampled window: no occurrence is missed.
const (
	matchStride = 4
	minPattern  = matchStride + 3
	filterBits  = 16
)

type matchEntry struct {
	pat uint8
	off uint8
}

type matcher struct {
	filter  [1 << filterBits / 64]uint64
	buckets map[uint32][]matchEntry
	lower   []string // patterns, ASCII-lowercased
}

type patSet [3]uint64

func (m *patSet) has(i int) bool { return m[i>>6]&(1<<(uint(i)&63)) != 0 }
func (m *patSet) set(i int)      { m[i>>6] |= 1 << (uint(i) & 63) }

var defaultMatcher = newMatcher(patterns)

func fold4(b []byte) uint32 { return binary.LittleEndian.Uint32(b) | 0x20202020 }

func hash4(w uint32) uint32 { return (w * 0x9E3779B1) >> (32 - filterBits) }

func newMatcher(ps []pattern) *matcher {
	if len(ps) > len(patSet{})*64 || len(ps) > 255 {
		panic("logparse: too many patterns")
	}
	m := &matcher{buckets: make(map[uint32][]matchEntry)}
	for i, p := range ps {
		if len(p.s) < minPattern {
			panic("logparse: pattern too short: " + p.s)
		}
		lp := strings.ToLower(p.s)
		m.lower = append(m.lower, lp)
		for off := 0; off < matchStride; off++ {
			h := hash4(fold4([]byte(lp[off : off+4])))
			m.filter[h>>6] |= 1 << (h & 63)
			m.buckets[h] = append(m.buckets[h], matchEntry{pat: uint8(i), off: uint8(off)})
		}
	}
	return m
}

// scan sets in found the patterns that occur in s and reports whether any did.
func (m *matcher) scan(s string, found *patSet) bool {
	b := unsafe.Slice(unsafe.StringData(s), len(s))
	any := false
	n := len(b)
	for q := 0; q+4 <= n; q += matchStride {
		h := hash4(fold4(b[q:]))
		if m.filter[h>>6]&(1<<(h&63)) == 0 {
			continue
		}
		for _, e := range m.buckets[h] {
			start := q - int(e.off)
			p := m.lower[e.pat]
			if start < 0 || start+len(p) > n || found.has(int(e.pat)) {
				continue
			}
			if equalFoldLower(b[start:start+len(p)], p) {
				found.set(int(e.pat))
				any = true
			}
		}
	}
	return any
}

// equalFoldLower reports whether b equals the lowercase ASCII string p,
// ignoring ASCII case in b.
func equalFoldLower(b []byte, p string) bool {
	for i := 0; i < len(p); i++ {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != p[i] {
			return false
		}
	}
	return true
}

// containsFold reports whether s contains sub, ignoring ASCII case. For
// second looks at candidate lines only.
func containsFold(s, sub string) bool {
	n := len(sub)
	if n == 0 {
		return true
	}
	ls := strings.ToLower(sub)
	for i := 0; i+n <= len(s); i++ {
		if equalFoldLower(unsafe.Slice(unsafe.StringData(s[i:]), n), ls) {
			return true
		}
	}
	return false
}

// PatternStrings returns the fixed strings the classifier looks for, in table
// order (the content of patterns.txt).
func PatternStrings() []string {
	out := make([]string, len(patterns))
	for i, p := range patterns {
		out[i] = p.s
	}
	return out
}
