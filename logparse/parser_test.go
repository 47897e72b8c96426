package logparse

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files and patterns.txt")

func run(text string, exit Exit) (Diagnosis, []Event) {
	p := NewParser()
	var evs []Event
	for _, l := range strings.Split(strings.TrimPrefix(text, "\n"), "\n") {
		evs = append(evs, p.Feed(l)...)
	}
	return p.Diagnose(exit), evs
}

const ts = "2026-01-05 09:03:07.123456: "

const epochs = ts + "Epoch 3\n" + ts + "Current learning rate: 0.00536\n"

const mainTB = `Traceback (most recent call last):
  File "/opt/venv/bin/nnUNetv2_train", line 8, in <module>
    sys.exit(run_training_entry())
  File "/opt/src/nnUNet/nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py", line 1426, in run_training
    train_outputs.append(self.train_step(next(self.dataloader_train)))
`

const deadWorkers = `Exception in thread Thread-1 (results_loop):
Traceback (most recent call last):
  File "/opt/src/batchgenerators/batchgenerators/dataloading/nondet_multi_threaded_augmenter.py", line 132, in results_loop
    raise RuntimeError("One or more background workers are no longer alive. Exiting. Please check the "
RuntimeError: One or more background workers are no longer alive. Exiting. Please check the print statements above for the actual error message
`

func TestSynthetic(t *testing.T) {
	tests := []struct {
		name string
		text string
		exit Exit
		want Class
		chk  func(t *testing.T, d Diagnosis)
	}{
		{"oom torch2.5", epochs + mainTB + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.46 GiB of which 406.88 MiB is free. Of the allocated memory 22.78 GiB is allocated by PyTorch, and 82.27 MiB is reserved by PyTorch but unallocated.\n" + deadWorkers, Exit{}, GPUOOM,
			func(t *testing.T, d Diagnosis) {
				if d.ReservedUnallocated || !strings.Contains(d.Reason, "2.00 GiB") || !strings.Contains(d.Reason, "training step") {
					t.Errorf("%+v", d)
				}
			}},
		{"oom lowercase", "runtimeerror: cuda out of memory\n", Exit{}, GPUOOM, nil},
		{"oom cublas", epochs + mainTB + "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`\n", Exit{}, GPUOOM, nil},
		{"oom cudnn", "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED\n", Exit{}, GPUOOM, nil},
		{"oom cuda error", "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.\n", Exit{}, GPUOOM, nil},
		{"oom ddp", "torch.multiprocessing.spawn.ProcessRaisedException: \n\n-- Process 1 terminated with the following error:\n" + mainTB + "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\n", Exit{}, GPUOOM, nil},
		{"oom inductor", "torch._inductor.exc.InductorError: RuntimeError: Failed to run autotuning code block: CUDA out of memory. Tried to allocate 1.00 GiB\n", Exit{}, GPUOOM, nil},
		{"oom before dead workers", deadWorkers[:0] + epochs + "torch.OutOfMemoryError: CUDA out of memory.\n" + deadWorkers, Exit{}, GPUOOM, nil},
		{"reserved unallocated new", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.68 GiB of which 1.50 GiB is free. Of the allocated memory 15.10 GiB is allocated by PyTorch, and 6.80 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True\n", Exit{}, GPUOOM,
			func(t *testing.T, d Diagnosis) {
				if !d.ReservedUnallocated || !strings.Contains(d.Reason, "expandable_segments") {
					t.Errorf("RU not set: %+v", d)
				}
			}},
		{"reserved unallocated old", "RuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; 10.76 GiB total capacity; 4.00 GiB already allocated; 500.00 MiB free; 9.50 GiB reserved in total by PyTorch)\n", Exit{}, GPUOOM,
			func(t *testing.T, d Diagnosis) {
				if !d.ReservedUnallocated {
					t.Errorf("RU not set: %+v", d)
				}
			}},
		{"reserved small", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.69 GiB total capacity; 20.12 GiB already allocated; 1.23 GiB free; 21.50 GiB reserved in total by PyTorch)\n", Exit{}, GPUOOM,
			func(t *testing.T, d Diagnosis) {
				if d.ReservedUnallocated {
					t.Errorf("RU set: 1.38 GiB < 2 GiB request")
				}
			}},
		{"plot oom caught", ts + "Unable to plot network architecture:\n" + ts + "CUDA out of memory. Tried to allocate 20.00 MiB\n" + epochs, Exit{}, None, nil},
		{"validation oom fallback continues", ts + "Training done.\n" + ts + "predicting case_1\nPrediction on device was unsuccessful, probably due to a lack of memory. Moving results arrays to CPU\n" + ts + "predicting case_2\n" + ts + "Validation complete\n", Exit{Known: true}, None, nil},
		{"validation fallback then ram", ts + "predicting case_1\nPrediction on device was unsuccessful, probably due to a lack of memory. Moving results arrays to CPU\nTraceback (most recent call last):\n  File \"x.py\", line 1, in predict\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"x.py\", line 2, in predict\nnumpy._core._exceptions._ArrayMemoryError: Unable to allocate 738. MiB for an array\n", Exit{}, GPUOOM,
			func(t *testing.T, d Diagnosis) {
				if !d.InValidation {
					t.Error("not InValidation")
				}
			}},
		{"worker corrupt npy", epochs + "Exception in background worker 3:\n mmap length is greater than file size\nTraceback (most recent call last):\n  File \"/x/batchgenerators/dataloading/nondet_multi_threaded_augmenter.py\", line 53, in producer\n    item = next(data_loader)\n  File \"/x/numpy/core/memmap.py\", line 268, in __new__\n    mm = mmap.mmap(fid.fileno(), bytes, access=acc, offset=start)\nValueError: mmap length is greater than file size: '/data/nnUNet_preprocessed/Dataset001/nnUNetPlans_3d_fullres/case_7.npy'\n" + deadWorkers, Exit{}, WorkerError,
			func(t *testing.T, d Diagnosis) {
				if !strings.HasSuffix(d.File, "case_7.npy") {
					t.Errorf("file %q", d.File)
				}
			}},
		{"worker windows path", "Exception in background worker 0:\n Cannot load file containing pickled data when allow_pickle=False\nTraceback (most recent call last):\n  File \"C:\\Users\\u\\batchgenerators\\dataloading\\nondet_multi_threaded_augmenter.py\", line 53, in producer\nValueError: Cannot load file containing pickled data when allow_pickle=False: 'D:\\nnUNet_preprocessed\\Dataset001\\case_1.npz'\n", Exit{}, WorkerError,
			func(t *testing.T, d Diagnosis) {
				if d.File != `D:\nnUNet_preprocessed\Dataset001\case_1.npz` {
					t.Errorf("file %q", d.File)
				}
			}},
		{"worker memoryerror is host", "Exception in background worker 1:\n Unable to allocate 1.2 GiB for an array with shape (4, 512, 512, 300) and data type float32\nTraceback (most recent call last):\n  File \"/x/nondet_multi_threaded_augmenter.py\", line 53, in producer\nnumpy.core._exceptions._ArrayMemoryError: Unable to allocate 1.2 GiB\n" + deadWorkers, Exit{}, HostOOM, nil},
		{"interleaved workers", "Exception in background worker 0:\nException in background worker 1:\n 'class_locations'\n 'class_locations'\nTraceback (most recent call last):\nTraceback (most recent call last):\n  File \"/x/nondet_multi_threaded_augmenter.py\", line 53, in producer\n  File \"/x/nondet_multi_threaded_augmenter.py\", line 53, in producer\nKeyError: 'class_locations'\nKeyError: 'class_locations'\n" + deadWorkers, Exit{}, WorkerError, nil},
		{"dead workers only", epochs + deadWorkers + mainTB + "RuntimeError: One or more background workers are no longer alive. Exiting.\n", Exit{Known: true, Code: 1}, HostOOM, nil},
		{"v1 abort event", ts + "epoch:  5\n" + "RuntimeError: MultiThreadedAugmenter.abort_event was set, something went wrong. Maybe one of your workers crashed. This is not the same as timeout.\n", Exit{}, HostOOM, nil},
		{"v1 abort someone died", "RuntimeError: Abort event was set. So someone died and we should end this madness. \n", Exit{}, HostOOM, nil},
		{"killed", epochs + "Killed\n", Exit{}, HostOOM, nil},
		{"bash killed", "./train.sh: line 3: 123456 Killed                  nnUNetv2_train 1 3d_fullres 0\n", Exit{}, HostOOM, nil},
		{"slurm oom", "slurmstepd: error: Detected 1 oom_kill event in StepId=1.batch. Some of your processes may have been killed by the cgroup out-of-memory handler.\n", Exit{}, HostOOM, nil},
		{"sigkill no output", epochs, Exit{Known: true, Signal: "SIGKILL"}, HostOOM, nil},
		{"shm", "RuntimeError: unable to write to file </torch_32096_1415667320_0>: No space left on device (28)\n" + deadWorkers, Exit{}, ShmExhausted, nil},
		{"shm dataloader", "RuntimeError: DataLoader worker (pid 123) is killed by signal: Bus error. It is possible that dataloader's workers are out of shared memory. Please try to raise your shared memory limit.\n", Exit{}, ShmExhausted, nil},
		{"export pool", ts + "Training done.\n" + ts + "predicting c1\nTraceback (most recent call last):\n  File \"/x/file_path_utilities.py\", line 101, in check_workers_alive_and_busy\n    raise RuntimeError('Some background workers are no longer alive')\nRuntimeError: Some background workers are no longer alive\n", Exit{}, ValidationExport,
			func(t *testing.T, d Diagnosis) {
				if !d.InValidation {
					t.Error("InValidation not set")
				}
			}},
		{"device assert", "/pytorch/aten/src/ATen/native/cuda/Loss.cu:250: nll_loss_forward_reduce_cuda_kernel_2d: block: [0,0,0], thread: [5,0,0] Assertion `t >= 0 && t < n_classes` failed.\n" + mainTB + "RuntimeError: CUDA error: device-side assert triggered\n" + deadWorkers, Exit{}, CUDAError,
			func(t *testing.T, d Diagnosis) {
				if !d.Deterministic {
					t.Error("not deterministic")
				}
			}},
		{"illegal access", mainTB + "RuntimeError: CUDA error: an illegal memory access was encountered\n", Exit{}, CUDAError,
			func(t *testing.T, d Diagnosis) {
				if d.Deterministic {
					t.Error("deterministic")
				}
			}},
		{"cudnn exec", "RuntimeError: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED\n", Exit{}, CUDAError, nil},
		{"xid", "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.\n", Exit{}, CUDAError, nil},
		{"unknown cuda error", "RuntimeError: CUDA error: unknown error\n", Exit{}, CUDAError, nil},
		{"no kernel image is config", "RuntimeError: CUDA error: no kernel image is available for execution on the device\n", Exit{}, ConfigError, nil},
		{"compile dynamo", mainTB + "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:\nCalledProcessError: Command '['/usr/bin/gcc', '/tmp/x.c']' returned non-zero exit status 1.\n" + deadWorkers, Exit{}, CompileError, nil},
		{"compile python.h", "/tmp/tmpabc/main.c:5:10: fatal error: Python.h: No such file or directory\n", Exit{}, CompileError, nil},
		{"nan 3 epochs fatal", nanEpochs(4), Exit{}, NaNLoss, nil},
		{"nan v1", ts + "\nepoch:  0\n" + ts + "train loss : nan\n" + ts + "validation loss: nan\n" + ts + "This epoch took 100.5 s\n", Exit{}, NaNLoss, nil},
		{"nan recovered", nanEpochs(1) + ts + "Epoch 9\n" + ts + "train_loss 0.3\n" + ts + "val_loss 0.2\n" + ts + "Epoch time: 10 s\n", Exit{}, None, nil},
		{"disk", mainTB + "OSError: [Errno 28] No space left on device\n", Exit{}, DiskFull, nil},
		{"disk numpy", "OSError: 8388608 requested and 0 written\n", Exit{}, DiskFull, nil},
		{"quota", "OSError: [Errno 122] Disk quota exceeded: '/results/x/checkpoint_latest.pth'\n", Exit{}, DiskFull, nil},
		{"ckpt zip", "Traceback (most recent call last):\n  File \"/x/nnUNetTrainer.py\", line 1230, in load_checkpoint\n    checkpoint = torch.load(filename_or_checkpoint, map_location=self.device)\nRuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory\n", Exit{}, CorruptCheckpoint, nil},
		{"ckpt eof", "Traceback (most recent call last):\n  File \"/x/nnUNetTrainer.py\", line 1230, in load_checkpoint\n    checkpoint = torch.load(filename_or_checkpoint)\n  File \"/x/torch/serialization.py\", line 1040, in _legacy_load\nEOFError: Ran out of input\n", Exit{}, CorruptCheckpoint, nil},
		{"ckpt load key", "_pickle.UnpicklingError: invalid load key, '\\x00'.\n", Exit{}, CorruptCheckpoint, nil},
		{"weights only", "_pickle.UnpicklingError: Weights only load failed. This file can still be loaded, to do so you have two options\n", Exit{}, ConfigError, nil},
		{"trainer missing", "RuntimeError: Could not find requested nnunet trainer nnUNetTrainerX in nnunetv2.training.nnUNetTrainer\n", Exit{}, ConfigError, nil},
		{"env 2.8", "RuntimeError: nnUNet_preprocessed is not defined. Please set it.\n", Exit{}, ConfigError, nil},
		{"env warning then crash", "nnUNet_raw is not defined and nnU-Net can only be used on data for which preprocessed files are already present on your system.\nTraceback (most recent call last):\n  File \"/x/run_training.py\", line 1, in run\nTypeError: expected str, bytes or os.PathLike object, not NoneType\n", Exit{}, ConfigError, nil},
		{"env warning alone", "nnUNet_raw is not defined and nnU-Net can only be used on data for which preprocessed files are already present on your system.\n" + epochs, Exit{}, None, nil},
		{"hiddenlayer benign", ts + "Unable to plot network architecture:\n" + ts + "No module named 'hiddenlayer'\n" + epochs, Exit{}, None, nil},
		{"module not found", "ModuleNotFoundError: No module named 'nnunetv2'\n", Exit{}, ConfigError, nil},
		{"val not finished", "RuntimeError: Cannot run validation because the training is not finished yet!\n", Exit{}, ConfigError, nil},
		{"config not in plans", "RuntimeError: Requested configuration 3d_lowres not found in plans. Available configurations: ['2d']\n", Exit{}, ConfigError, nil},
		{"unknown exception", epochs + mainTB + "ZeroDivisionError: division by zero\n" + deadWorkers, Exit{}, Unknown,
			func(t *testing.T, d Diagnosis) {
				if !strings.Contains(d.Reason, "ZeroDivisionError") {
					t.Errorf("reason %q", d.Reason)
				}
			}},
		{"nonzero exit no text", epochs, Exit{Known: true, Code: 3}, Unknown, nil},
		{"clean exit", epochs, Exit{Known: true}, None, nil},
		{"keyboard interrupt", epochs + mainTB + "KeyboardInterrupt\n" + deadWorkers, Exit{}, None, nil},
		{"truncated first half missing", "    return forward_call(*args, **kwargs)\n  File \"/x/nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py\", line 881, in train_step\n    output = self.network(data)\n  File \"/x/torch/nn/modules/module.py\", line 1501, in _call_impl\n", Exit{}, GPUOOM,
			func(t *testing.T, d Diagnosis) {
				if !strings.Contains(d.Reason, "inferred") {
					t.Errorf("reason %q", d.Reason)
				}
			}},
		{"truncated mid traceback unknown", epochs + "Traceback (most recent call last):\n  File \"/x/run_training.py\", line 1, in run\n", Exit{}, Unknown, nil},
		{"ci prefixed", "[2024-04-20T22:34:42.874Z] torch.cuda.OutOfMemoryError: CUDA out of memory.\n", Exit{}, GPUOOM, nil},
		{"markdown", "**RuntimeError: CUDA error: device-side assert triggered**\n", Exit{}, CUDAError, nil},
		{"faulthandler dump", "Current thread 0x00007f2fad16e2c0 (most recent call first):\n  File \"/x/pool.py\", line 675 in _help_stuff_finish\n", Exit{}, None, nil},
		// torch.compile refused or without a toolchain; gcc building Triton's main.c (then workers die).
		{"dynamo python version", mainTB + "RuntimeError: Dynamo is not supported on Python 3.12+\n", Exit{}, CompileError, nil},
		{"no c compiler", mainTB + "RuntimeError: Failed to find C compiler. Please specify via CC environment variable.\n", Exit{}, CompileError, nil},
		{"gcc main.c errors", epochs + "/tmp/tmpq1w2e3/main.c: In function 'list_to_array':\n/tmp/tmpq1w2e3/main.c:354:3: error: 'for' loop initial declarations are only allowed in C99 mode\n" + deadWorkers, Exit{}, CompileError, nil},
		{"gcc missing header", epochs + "In file included from /usr/include/python3.10/Python.h:8,\n/usr/include/python3.10/pyconfig.h:3:12: fatal error: x86_64-linux-gnu/python3.10/pyconfig.h: No such file or directory\ncompilation terminated.\n", Exit{}, CompileError, nil},
		{"truncated in dynamo tracing", mainTB + "  File \"/x/torch/_dynamo/convert_frame.py\", line 500, in transform\n    tracer.run()\n", Exit{}, CompileError, nil},
		// Windows host memory.
		{"windows paging file", epochs + "OSError: [WinError 1455] The paging file is too small for this operation to complete\n" + deadWorkers, Exit{}, HostOOM, nil},
		{"windows not enough storage", "OSError: [WinError 8] Not enough storage is available to process this command\n", Exit{}, HostOOM, nil},
		// DDP: a rank SIGKILLed; the NCCL watchdog taking a rank down.
		{"ddp rank killed", epochs + "torch.multiprocessing.spawn.ProcessExitedException: process 1 terminated with signal SIGKILL\n", Exit{}, HostOOM, nil},
		{"nccl watchdog", "[rank1]:[E ProcessGroupNCCL.cpp:563] [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLGATHER) ran for 600081 milliseconds before timing out.\n", Exit{}, CUDAError, nil},
		// v1: the dead-worker thread's error, then the main traceback cut off.
		{"dead workers then truncated", epochs + "Exception in thread Thread-4:\nRuntimeError: Abort event was set. So someone died and we should end this madness. \nTraceback (most recent call last):\n  File \"run_training.py\", line 203, in <module>\n    main()\n", Exit{}, HostOOM, nil},
		{"truncated in get_next_item", epochs + "Traceback (most recent call last):\n  File \"/x/network_trainer.py\", line 456, in run_training\n    l = self.run_iteration(self.tr_gen, True)\n  File \"/x/batchgenerators/dataloading/multi_threaded_augmenter.py\", line 206, in __next__\n    item = self.__get_next_item()\n", Exit{}, HostOOM,
			func(t *testing.T, d Diagnosis) {
				if !strings.Contains(d.Reason, "inferred") {
					t.Errorf("reason %q", d.Reason)
				}
			}},
		{"cudnn other status", mainTB + "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.\n", Exit{}, CUDAError, nil},
		{"cudnn alloc is oom", "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED\n", Exit{}, GPUOOM, nil},
		{"preprocessing worker gone", "RuntimeError: Some background worker is 6 feet under. Yuck.\n", Exit{}, HostOOM, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := run(tc.text, tc.exit)
			if d.Class != tc.want {
				t.Fatalf("got %s, want %s\nreason: %s\nevidence: %v", d.Class, tc.want, d.Reason, d.Evidence)
			}
			if len(d.Evidence) > maxEvidence || d.Reason == "" {
				t.Errorf("evidence %d, reason %q", len(d.Evidence), d.Reason)
			}
			for i := 1; i < len(d.Evidence); i++ {
				if d.Evidence[i].Line <= d.Evidence[i-1].Line {
					t.Errorf("evidence not in log order: %v", d.Evidence)
				}
			}
			if tc.chk != nil {
				tc.chk(t, d)
			}
		})
	}
}

func nanEpochs(n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "%sEpoch %d\n%strain_loss nan\n%sval_loss nan\n%sPseudo dice [0.0]\n%sEpoch time: 10.5 s\n", ts, i, ts, ts, ts, ts)
	}
	return b.String()
}

func TestNaNFatalAfterThreeEpochs(t *testing.T) {
	p := NewParser()
	var fatal []Event
	epoch := -1
	for _, l := range strings.Split(nanEpochs(5), "\n") {
		for _, e := range p.Feed(l) {
			if e.Kind == Fatal {
				fatal = append(fatal, e)
				epoch = p.Epoch()
			}
		}
	}
	if len(fatal) != 1 || fatal[0].Class != NaNLoss || epoch != NaNEpochs-1 {
		t.Fatalf("fatal %+v at epoch %d", fatal, epoch)
	}
	// Two NaN epochs then a good one: no Fatal.
	text := nanEpochs(2) + ts + "Epoch 2\n" + ts + "train_loss 0.1\n" + ts + "val_loss 0.2\n" + ts + "Epoch time: 1 s\n" + nanEpochs(2)
	_, evs := run(text, Exit{})
	if f := kinds(evs, Fatal); len(f) != 0 {
		t.Errorf("unexpected fatal %+v", f)
	}
}

func TestFatalTiming(t *testing.T) {
	tests := []struct {
		name string
		text string
		line string // the line the Fatal must come on
		cls  Class
	}{
		{"oom", epochs + mainTB + "torch.OutOfMemoryError: CUDA out of memory.\n" + deadWorkers, "torch.OutOfMemoryError: CUDA out of memory.", GPUOOM},
		{"worker", "Exception in background worker 0:\n boom\nTraceback (most recent call last):\n  File \"/x/nondet_multi_threaded_augmenter.py\", line 53, in producer\nValueError: boom\n" + deadWorkers, "ValueError: boom", WorkerError},
		{"results_loop first", epochs + deadWorkers, "Exception in thread Thread-1 (results_loop):", HostOOM},
		{"generic", mainTB + "ZeroDivisionError: division by zero\n", "ZeroDivisionError: division by zero", Unknown},
		{"assert", "/x/Loss.cu:250: k: block: [0,0,0], thread: [5,0,0] Assertion `t >= 0` failed.\n", "/x/Loss.cu:250: k: block: [0,0,0], thread: [5,0,0] Assertion `t >= 0` failed.", CUDAError},
		{"fallback oom chained", ts + "predicting c1\nPrediction on device was unsuccessful, probably due to a lack of memory. Moving results arrays to CPU\nTraceback (most recent call last):\n  File \"x.py\", line 1, in p\ntorch.OutOfMemoryError: CUDA out of memory.\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"x.py\", line 2, in p\nRuntimeError: Cannot set version_counter for inference tensor\n", "RuntimeError: Cannot set version_counter for inference tensor", GPUOOM},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lines := strings.Split(strings.TrimPrefix(tc.text, "\n"), "\n")
			p := NewParser()
			var fat []Event
			for _, l := range lines {
				fat = append(fat, kinds(p.Feed(l), Fatal)...)
			}
			if len(fat) != 1 {
				t.Fatalf("fatal events %+v", fat)
			}
			if got := lines[fat[0].Line-1]; got != tc.line || fat[0].Class != tc.cls {
				t.Errorf("fatal %s on %q, want %s on %q", fat[0].Class, got, tc.cls, tc.line)
			}
		})
	}
	// The predictor's fallback message alone is never fatal.
	_, evs := run(ts+"predicting c1\nPrediction on device was unsuccessful, probably due to a lack of memory. Moving results arrays to CPU\n"+ts+"predicting c2\n", Exit{})
	if f := kinds(evs, Fatal); len(f) != 0 {
		t.Errorf("fallback fatal: %+v", f)
	}
}

func TestV1Progress(t *testing.T) {
	text := `For that I will be using the following configuration:
num_classes:  2
stages...

stage:  0
{'batch_size': 9, 'num_pool_per_axis': [4, 5, 5], 'patch_size': array([ 80, 192, 160])}

stage:  1
{'batch_size': 2, 'num_pool_per_axis': [5, 5, 5]}


I am using stage 1 from these plans
` + ts + "\nepoch:  0\n" + ts + "train loss : 0.5\n" + ts + "This epoch took 120.25 s\n" + ts + "\nepoch:  1\n"
	_, evs := run(text, Exit{})
	if bs := kinds(evs, BatchSize); len(bs) != 1 || bs[0].BatchSize != 2 {
		t.Errorf("batch size %+v", bs)
	}
	st := kinds(evs, EpochStart)
	if len(st) != 2 || st[1].Epoch != 1 {
		t.Errorf("epochs %+v", st)
	}
	if en := kinds(evs, EpochEnd); len(en) != 1 || en[0].Seconds != 120.25 || en[0].Epoch != 0 {
		t.Errorf("epoch end %+v", en)
	}
}

func TestEventsSliceReuse(t *testing.T) {
	p := NewParser()
	a := p.Feed(ts + "Epoch 1")
	if len(a) != 1 || a[0].Line != 1 || a[0].Epoch != 1 {
		t.Fatalf("%+v", a)
	}
	if b := p.Feed("nothing"); len(b) != 0 || p.Line() != 2 {
		t.Fatalf("%+v", b)
	}
}

func TestPatternsFile(t *testing.T) {
	want := strings.Join(PatternStrings(), "\n") + "\n"
	if *update {
		if err := os.WriteFile("patterns.txt", []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile("patterns.txt")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Errorf("patterns.txt is out of date: run go test ./logparse -run TestPatternsFile -update")
	}
	seen := map[string]bool{}
	for _, p := range PatternStrings() {
		if seen[strings.ToLower(p)] {
			t.Errorf("duplicate pattern %q", p)
		}
		seen[strings.ToLower(p)] = true
	}
}

// TestMatcherAgainstNaive checks the stride filter against strings.Contains.
func TestMatcherAgainstNaive(t *testing.T) {
	var lines []string
	for _, dir := range []string{realCorpus, cpuCorpus} {
		files, _ := filepath.Glob(filepath.Join(dir, "*"))
		for _, f := range files {
			b, _ := os.ReadFile(f)
			lines = append(lines, strings.Split(string(b), "\n")...)
		}
	}
	for _, p := range patterns {
		lines = append(lines, "x"+p.s, p.s+"y", strings.ToUpper(p.s), "ab "+strings.ToLower(p.s)+" cd")
	}
	for _, l := range lines {
		var got patSet
		defaultMatcher.scan(l, &got)
		ll := strings.ToLower(l)
		for i, p := range patterns {
			if want := strings.Contains(ll, strings.ToLower(p.s)); want != got.has(i) {
				t.Fatalf("pattern %q in %q: got %v want %v", p.s, l, got.has(i), want)
			}
		}
	}
	if !slices.Contains(PatternStrings(), "CUDA out of memory") {
		t.Error("table lost its main pattern")
	}
}
