// Package logparse turns the raw console output of nnUNetv2_train into lines
// and typed events: training progress (epochs, epoch time, batch size,
// "Training done.") and failures, each classified to its root cause with the
// evidence lines that support it. It is pure: bytes and lines in, values out.
package logparse

// Class names a failure's root cause. The names are part of nnguard's
// interface (events.jsonl, `nnguard classify --json`): never rename them.
type Class string

const (
	None              Class = "none"               // no failure in the text
	GPUOOM            Class = "gpu_oom"            // CUDA out of memory, any spelling
	HostOOM           Class = "host_oom"           // a worker killed (host RAM), no exception of its own
	WorkerError       Class = "worker_error"       // "Exception in background worker N:" (data or code error)
	ShmExhausted      Class = "shm_exhausted"      // /dev/shm full while passing tensors between processes
	ValidationExport  Class = "validation_export"  // export pool died during the final validation
	CUDAError         Class = "cuda_error"         // device-side assert, illegal access, cuDNN/cuBLAS execution errors, Xid
	CompileError      Class = "compile_error"      // torch.compile / inductor / Triton failures
	NaNLoss           Class = "nan_loss"           // train_loss/val_loss nan for several epochs
	DiskFull          Class = "disk_full"          // no space left on the results or preprocessed disk
	CorruptCheckpoint Class = "corrupt_checkpoint" // truncated or unreadable checkpoint
	ConfigError       Class = "config_error"       // wrong dataset, plans, trainer, env, version mismatch
	Unknown           Class = "unknown"            // a crash that matches nothing above
	// Classes decided outside the text (by the supervisor's watchdog or GPU state).
	Stall         Class = "stall"          // no progress and no CPU use for too long
	GPUContention Class = "gpu_contention" // OOM while other processes hold a large share of the GPU
	GPUFault      Class = "gpu_fault"      // critical Xid: the GPU itself is broken
)

// Evidence is one line of the log that supports a diagnosis. Line is 1-based
// and counts lines as the Splitter emits them.
type Evidence struct {
	Line int    `json:"line"`
	Text string `json:"text"`
}

// Diagnosis is the root cause of a failure, with the facts the policy needs.
type Diagnosis struct {
	Class    Class      `json:"class"`
	Reason   string     `json:"reason"`   // one sentence, for humans
	Evidence []Evidence `json:"evidence"` // the lines that show it, in log order

	// ReservedUnallocated: the OOM message says a large share of the GPU
	// memory is reserved by PyTorch but unallocated (fragmentation), so
	// PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may help.
	ReservedUnallocated bool `json:"reserved_unallocated,omitempty"`
	// Deterministic: the failure will repeat unchanged on restart
	// (device-side asserts from bad label values, for example).
	Deterministic bool `json:"deterministic,omitempty"`
	// File is the file the traceback names as the culprit (a corrupt .npy,
	// a checkpoint), when it names one.
	File string `json:"file,omitempty"`
	// InValidation: the failure happened after "Training done.", during the
	// final validation.
	InValidation bool `json:"in_validation,omitempty"`
}

// EventKind tells what a line meant.
type EventKind int

const (
	EpochStart     EventKind = iota + 1 // "Epoch N"                       (Epoch)
	EpochEnd                            // "Epoch time: X s"               (Epoch, Seconds)
	NewBest                             // "Yayy! New best EMA pseudo Dice" (Epoch)
	BatchSize                           // 'batch_size': N in the printed configuration (BatchSize)
	TrainingDone                        // "Training done."
	ValidationCase                      // "predicting <case>" in the final validation (Text = case)
	ValidationDone                      // "Validation complete"
	Fatal                               // the trainer will not recover: a fatal error was printed (Class)
)

// Event is something a line told about the trainer.
type Event struct {
	Kind      EventKind
	Line      int     // 1-based line number
	Epoch     int     // 0-based epoch the event belongs to, -1 if unknown
	Seconds   float64 // EpochEnd: the epoch time
	BatchSize int     // BatchSize: the effective batch size
	Class     Class   // Fatal: the class known so far
	Text      string  // ValidationCase: the case name
}

// Exit describes how the trainer process ended, for Diagnose. Zero value
// means "unknown" (a saved log).
type Exit struct {
	Known  bool
	Code   int    // exit status when it exited normally
	Signal string // "SIGKILL", ... when killed by a signal
}
