#!/usr/bin/env python3
"""Simulated ``nnUNetv2_train`` (nnU-Net v2.8.1) for testing nnguard without torch or a GPU.

Python 3.11 standard library only. Same CLI, console/log texts, results-folder layout, checkpoint
schedule and file format (torch zip layout) as the real trainer, with real forked data-augmentation
worker processes and a real spawned export Pool. Failures are injected with ``NNGUARD_SIM_*``
environment variables. Where this file and the real nnU-Net differ, the real one is right.

Knobs (environment variables)
=============================

| name | default | meaning |
|---|---|---|
| NNGUARD_SIM_EPOCHS | 1000 | num_epochs of the trainer |
| NNGUARD_SIM_EPOCH_SECONDS | 1.0 | seconds slept per epoch (the "Epoch time") |
| NNGUARD_SIM_SAVE_EVERY | 50 | checkpoint_latest.pth after epoch e when (e+1) % N == 0 and e is not the last |
| NNGUARD_SIM_VAL_CASES | 4 | number of validation cases predicted in the final validation |
| NNGUARD_SIM_VAL_CASE_SECONDS | 0.05 | seconds per validation case |
| NNGUARD_SIM_SEED | 0 | seed for losses / pseudo dice (deterministic per epoch) |
| NNGUARD_SIM_VERSION | 2.8.1 | "2.0"/"2.1": `--c` without any checkpoint crashes (tries to load checkpoint_best.pth) |
| NNGUARD_SIM_TRAINERS | (empty) | comma-separated extra trainer class names accepted besides `nnUNetTrainer*` |
| NNGUARD_SIM_SHUTDOWN_NOISE | 0 | 1: after a main-process exception also print the `Exception in thread Thread-N (results_loop)` tracebacks real runs print while shutting down (then the exception is not the last line; compile_error always prints them) |
| NNGUARD_SIM_GPU_MIB | 24576 | simulated GPU total memory (MiB) |
| NNGUARD_SIM_BASE_MIB | 2000 | model + CUDA context memory (MiB) |
| NNGUARD_SIM_SAMPLE_MIB | 1000 | memory per sample of the per-GPU batch (MiB) |
| NNGUARD_SIM_OOM_FROM_EPOCH | 0 | first epoch at which a too-large batch raises the CUDA OOM (at the first train iteration of epoch max(current, N)) |
| NNGUARD_SIM_FRAGMENTED | 0 | 1: 35% of the GPU is "reserved by PyTorch but unallocated" (counts against the budget) unless PYTORCH_CUDA_ALLOC_CONF contains expandable_segments:True |
| NNGUARD_SIM_GPU_STATE | (unset) | path of a JSON GPU state file written atomically at start, every epoch and at exit |
| NNGUARD_SIM_FOREIGN_MIB | 0 | memory held by a foreign GPU process (pid 999999, "foreign_job") |
| NNGUARD_SIM_FOREIGN_SECONDS | 3600 | how long the foreign process holds it, from the first start (absolute "until" kept in the state file across restarts; without a state file it is recomputed per start) |
| NNGUARD_SIM_XID_AT_EPOCH | (unset) | at epoch >= N: append an Xid 79 to the state file and die with `RuntimeError: CUDA error: unknown error` (exit 1) |
| NNGUARD_SIM_HOST_MIB | 65536 | simulated host RAM (MiB) |
| NNGUARD_SIM_WORKER_MIB | 300 | RAM per DA worker (MiB) |
| NNGUARD_SIM_MAIN_MIB | 800 | RAM of the main process (MiB) |
| NNGUARD_SIM_HOST_OOM_FROM_EPOCH | 0 | if MAIN + workers*WORKER > HOST: at epoch >= N the main SIGKILLs a real worker child and dies with the batchgenerators dead-worker texts (no workers: the main SIGKILLs itself) |
| NNGUARD_SIM_REAL_WORKER_MIB | 0 | each DA worker really allocates and touches this much host memory (MiB) at start, so a memory cgroup limit gets workers killed by the kernel's OOM killer; the main process notices a dead worker within ~0.05 s like batchgenerators does |
| NNGUARD_SIM_HANG_AFTER_FATAL | 0 | 1: after printing a fatal traceback block forever (no CPU), workers stay alive |
| NNGUARD_SIM_STALL_AT_EPOCH | (unset) | at the start of epoch >= N print the epoch header, then go silent forever (no CPU) |
| NNGUARD_SIM_STALL_IN_VALIDATION | (unset) | stall silently after the `<case>, shape ...` line of validation case K (0-based) |
| NNGUARD_SIM_WORKER_EXCEPTION_AT_EPOCH | (unset) | at epoch >= N train worker 0 raises (`Exception in background worker 0:`), main dies with the dead-worker RuntimeError; N=0 on a fresh start fails during dataloader setup like x_worker_exception_at_startup.log |
| NNGUARD_SIM_WORKER_EXCEPTION_KIND | mmap | mmap (`ValueError: mmap length is greater than file size`), reshape (`ValueError: cannot reshape array ...`) or io (`OSError: [Errno 5] Input/output error: '<nnUNet_preprocessed>/...pkl'`) |
| NNGUARD_SIM_CRASH_AT_EPOCH | (unset) | at epoch >= N a plain Python exception (`IndexError: list index out of range` in the logger), exit 1 |
| NNGUARD_SIM_TRUNCATE_CHECKPOINT_AT_EPOCH | (unset) | at the first checkpoint_latest.pth save at epoch >= N write only the first 60% of the file, then SIGKILL itself |
| NNGUARD_SIM_FAIL | (unset) | failure class: shm_exhausted, validation_export, cuda_assert, cuda_illegal, compile_error, nan_loss, disk_full, config_weights_only |
| NNGUARD_SIM_FAIL_EPOCH | 0 | epoch from which NNGUARD_SIM_FAIL applies (disk_full: the first checkpoint save at epoch >= N) |
| NNGUARD_SIM_SHM_WORKERS | 2 | shm_exhausted only fires while nnUNet_n_proc_DA > this |
| NNGUARD_SIM_EXPORT_PROCS_OK | 2 | validation_export only fires while nnUNet_def_n_proc > this |
| NNGUARD_SIM_MAX_POOL | 2 | cap on the size of the spawned export / metrics Pools (nnUNet_def_n_proc, default 8) |
| NNGUARD_SIM_ONCE_FILE | (unset) | JSON list file: injected faults (stall, validation stall, crash, worker exception, truncate, xid, cuda_assert, cuda_illegal, nan_loss, disk_full, config_weights_only) fire only once; resource-driven ones (GPU OOM, host OOM, shm_exhausted, validation_export, compile_error) always fire while their condition holds |

nnU-Net's own environment variables are honoured: nnUNet_raw, nnUNet_preprocessed, nnUNet_results (required),
nnUNet_n_proc_DA (default min(12, cpu_count)), nnUNet_def_n_proc (default 8), nnUNet_compile,
PYTORCH_CUDA_ALLOC_CONF.

GPU state file format: {"name": "Simulated GPU", "uuid": "GPU-sim-0", "total_mib": N, "used_mib": N,
"processes": [{"pid": P, "name": "python3", "used_mib": N}, {"pid": 999999, "name": "foreign_job",
"used_mib": M, "until": T}], "xids": [{"xid": 79, "time": T}], "foreign": {...}, "updated": T}. After a
SIGKILL of the main process the file still lists its pid: check pid liveness.
"""

import argparse
import copy
import datetime
import io
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import pickle
import random
import signal
import struct
import sys
import time
import zipfile
import zlib
from collections import OrderedDict

# ----------------------------------------------------------------------------------------------------------
# knobs

def _env_str(name, default=None):
    v = os.environ.get(name)
    if v is None or v == '':
        return default
    return v


def _env_num(name, default, conv):
    v = _env_str(name)
    if v is None:
        return default
    try:
        return conv(v)
    except ValueError:
        return default


def _env_int(name, default=None):
    return _env_num(name, default, lambda v: int(float(v)))


def _env_float(name, default=None):
    return _env_num(name, default, float)


class Knobs:
    def __init__(self):
        self.epochs = _env_int('NNGUARD_SIM_EPOCHS', 1000)
        self.epoch_seconds = _env_float('NNGUARD_SIM_EPOCH_SECONDS', 1.0)
        self.save_every = max(1, _env_int('NNGUARD_SIM_SAVE_EVERY', 50))
        self.val_cases = max(0, _env_int('NNGUARD_SIM_VAL_CASES', 4))
        self.val_case_seconds = _env_float('NNGUARD_SIM_VAL_CASE_SECONDS', 0.05)
        self.seed = _env_int('NNGUARD_SIM_SEED', 0)
        self.version = _env_str('NNGUARD_SIM_VERSION', '2.8.1')
        self.trainers = [t.strip() for t in _env_str('NNGUARD_SIM_TRAINERS', '').split(',') if t.strip()]
        self.shutdown_noise = _env_int('NNGUARD_SIM_SHUTDOWN_NOISE', 0) == 1
        self.gpu_mib = _env_int('NNGUARD_SIM_GPU_MIB', 24576)
        self.base_mib = _env_int('NNGUARD_SIM_BASE_MIB', 2000)
        self.sample_mib = _env_int('NNGUARD_SIM_SAMPLE_MIB', 1000)
        self.oom_from_epoch = _env_int('NNGUARD_SIM_OOM_FROM_EPOCH', 0)
        self.fragmented = _env_int('NNGUARD_SIM_FRAGMENTED', 0) == 1
        self.gpu_state = _env_str('NNGUARD_SIM_GPU_STATE')
        self.foreign_mib = _env_int('NNGUARD_SIM_FOREIGN_MIB', 0)
        self.foreign_seconds = _env_float('NNGUARD_SIM_FOREIGN_SECONDS', 3600.0)
        self.xid_at_epoch = _env_int('NNGUARD_SIM_XID_AT_EPOCH')
        self.host_mib = _env_int('NNGUARD_SIM_HOST_MIB', 65536)
        self.worker_mib = _env_int('NNGUARD_SIM_WORKER_MIB', 300)
        self.main_mib = _env_int('NNGUARD_SIM_MAIN_MIB', 800)
        self.host_oom_from_epoch = _env_int('NNGUARD_SIM_HOST_OOM_FROM_EPOCH', 0)
        self.real_worker_mib = _env_int('NNGUARD_SIM_REAL_WORKER_MIB', 0)
        self.hang_after_fatal = _env_int('NNGUARD_SIM_HANG_AFTER_FATAL', 0) == 1
        self.stall_at_epoch = _env_int('NNGUARD_SIM_STALL_AT_EPOCH')
        self.stall_in_validation = _env_int('NNGUARD_SIM_STALL_IN_VALIDATION')
        self.worker_exception_at_epoch = _env_int('NNGUARD_SIM_WORKER_EXCEPTION_AT_EPOCH')
        self.worker_exception_kind = _env_str('NNGUARD_SIM_WORKER_EXCEPTION_KIND', 'mmap')
        self.crash_at_epoch = _env_int('NNGUARD_SIM_CRASH_AT_EPOCH')
        self.truncate_at_epoch = _env_int('NNGUARD_SIM_TRUNCATE_CHECKPOINT_AT_EPOCH')
        self.fail = _env_str('NNGUARD_SIM_FAIL')
        self.fail_epoch = _env_int('NNGUARD_SIM_FAIL_EPOCH', 0)
        self.shm_workers = _env_int('NNGUARD_SIM_SHM_WORKERS', 2)
        self.export_procs_ok = _env_int('NNGUARD_SIM_EXPORT_PROCS_OK', 2)
        self.max_pool = max(1, _env_int('NNGUARD_SIM_MAX_POOL', 2))
        self.once_file = _env_str('NNGUARD_SIM_ONCE_FILE')


K = None  # Knobs, set in main()

# ----------------------------------------------------------------------------------------------------------
# fake install paths used in the tracebacks (they imitate a virtualenv install of nnunetv2 + torch)

VENV = '/opt/venv'
SITE = VENV + '/lib/python3.11/site-packages'
NNU = SITE + '/nnunetv2'
BG = SITE + '/batchgenerators'
TORCH = SITE + '/torch'
PYLIB = '/usr/lib/python3.11'
BG_NONDET = BG + '/dataloading/nondet_multi_threaded_augmenter.py'
TRAINER_PY = NNU + '/training/nnUNetTrainer/nnUNetTrainer.py'
RUN_PY = NNU + '/run/run_training.py'

DEAD_WORKERS_MSG = ('One or more background workers are no longer alive. Exiting. Please check the print '
                    'statements above for the actual error message')


def out(*args):
    print(*args, flush=True)


def err(text):
    sys.stderr.write(text if text.endswith('\n') else text + '\n')
    sys.stderr.flush()


def tb_entry():
    return [
        'Traceback (most recent call last):',
        f'  File "{VENV}/bin/nnUNetv2_train", line 8, in <module>',
        '    sys.exit(run_training_entry())',
        '             ^^^^^^^^^^^^^^^^^^^^',
        f'  File "{RUN_PY}", line 259, in run_training_entry',
        '    run_training(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p, args.pretrained_weights,',
    ]


def tb_run_training():
    return tb_entry() + [
        f'  File "{RUN_PY}", line 200, in run_training',
        '    nnunet_trainer.run_training()',
    ]


def tb_train_step():
    return tb_run_training() + [
        f'  File "{TRAINER_PY}", line 1426, in run_training',
        '    train_outputs.append(self.train_step(next(self.dataloader_train)))',
        '                         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]


def tb_forward():
    return tb_train_step() + [
        f'  File "{TRAINER_PY}", line 1062, in train_step',
        '    output = self.network(data)',
        '             ^^^^^^^^^^^^^^^^^^',
        f'  File "{TORCH}/nn/modules/module.py", line 1736, in _wrapped_call_impl',
        '    return self._call_impl(*args, **kwargs)',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{TORCH}/nn/modules/module.py", line 1747, in _call_impl',
        '    return forward_call(*args, **kwargs)',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]


def tb_results_loop_thread(n):
    return '\n'.join([
        f'Exception in thread Thread-{n} (results_loop):',
        'Traceback (most recent call last):',
        f'  File "{PYLIB}/threading.py", line 1045, in _bootstrap_inner',
        '    self.run()',
        f'  File "{PYLIB}/threading.py", line 982, in run',
        '    self._target(*self._args, **self._kwargs)',
        f'  File "{BG_NONDET}", line 152, in results_loop',
        '    raise e',
        f'  File "{BG_NONDET}", line 132, in results_loop',
        '    raise RuntimeError("One or more background workers are no longer alive. Exiting. Please check the "',
        f'RuntimeError: {DEAD_WORKERS_MSG}',
    ])


def tb_main_dead_workers(at_startup=False):
    if at_startup:
        lines = tb_run_training() + [
            f'  File "{TRAINER_PY}", line 1418, in run_training',
            '    self.on_train_start()',
            f'  File "{TRAINER_PY}", line 946, in on_train_start',
            '    self.dataloader_train, self.dataloader_val = self.get_dataloaders()',
            '                                                 ^^^^^^^^^^^^^^^^^^^^^^',
            f'  File "{TRAINER_PY}", line 734, in get_dataloaders',
            '    _ = next(mt_gen_train)',
            '        ^^^^^^^^^^^^^^^^^^',
        ]
    else:
        lines = tb_run_training() + [
            f'  File "{TRAINER_PY}", line 1426, in run_training',
            '    train_outputs.append(self.train_step(next(self.dataloader_train)))',
            '                                         ^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        ]
    lines += [
        f'  File "{BG_NONDET}", line 220, in __next__',
        '    item = self.__get_next_item()',
        '           ^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{BG_NONDET}", line 206, in __get_next_item',
        '    raise RuntimeError("One or more background workers are no longer alive. Exiting. Please check the "',
        f'RuntimeError: {DEAD_WORKERS_MSG}',
    ]
    return '\n'.join(lines)


CUDA_ASYNC_NOTE = ('CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace '
                   'below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n'
                   'Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n')


def fmt_size(mib):
    """torch's format_size for a MiB amount."""
    b = mib * 1024 * 1024
    if b < 1024 * 1024 * 1024:
        return '%.2f MiB' % (b / (1024 * 1024))
    return '%.2f GiB' % (b / (1024 * 1024 * 1024))


# ----------------------------------------------------------------------------------------------------------
# once-file

def once_fired(name):
    if not K.once_file:
        return False
    try:
        with open(K.once_file) as f:
            return name in json.load(f)
    except (OSError, ValueError):
        return False


def once_record(name):
    if not K.once_file:
        return
    try:
        with open(K.once_file) as f:
            fired = json.load(f)
    except (OSError, ValueError):
        fired = []
    if name not in fired:
        fired.append(name)
    tmp = K.once_file + '.tmp%d' % os.getpid()
    with open(tmp, 'w') as f:
        json.dump(fired, f)
    os.replace(tmp, K.once_file)


def fault_due(name, at_epoch, epoch, once=True):
    """An injected fault scheduled at `at_epoch` fires in the first epoch >= at_epoch run by this process."""
    if at_epoch is None or epoch < at_epoch:
        return False
    if once and once_fired(name):
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# simulated GPU state file

class GpuState:
    FOREIGN_PID = 999999

    def __init__(self):
        self.path = K.gpu_state
        self.own_mib = 0
        self.state = {}
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    self.state = json.load(f)
            except (OSError, ValueError):
                self.state = {}
        self.xids = list(self.state.get('xids', []))
        self.foreign = None
        if K.foreign_mib > 0:
            old = self.state.get('foreign')
            if isinstance(old, dict) and old.get('used_mib') == K.foreign_mib and 'until' in old:
                self.foreign = old
            else:
                self.foreign = {'pid': self.FOREIGN_PID, 'name': 'foreign_job', 'used_mib': K.foreign_mib,
                                'until': time.time() + K.foreign_seconds}

    def foreign_active_mib(self):
        if self.foreign and time.time() < self.foreign['until']:
            return self.foreign['used_mib']
        return 0

    def write(self, own_alive=True):
        if not self.path:
            return
        procs = []
        if own_alive and self.own_mib > 0:
            procs.append({'pid': os.getpid(), 'name': 'python3', 'used_mib': self.own_mib})
        if self.foreign_active_mib():
            procs.append(dict(self.foreign))
        st = {'name': 'Simulated GPU', 'uuid': 'GPU-sim-0', 'total_mib': K.gpu_mib,
              'used_mib': min(K.gpu_mib, sum(p['used_mib'] for p in procs)), 'processes': procs,
              'xids': self.xids, 'updated': time.time()}
        if self.foreign:
            st['foreign'] = self.foreign
        tmp = '%s.tmp%d' % (self.path, os.getpid())
        try:
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            with open(tmp, 'w') as f:
                json.dump(st, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:
            pass


GPU = None

# ----------------------------------------------------------------------------------------------------------
# torch-style checkpoint files (zip, <stem>/data.pkl with persistent ids, <stem>/data/N, <stem>/version)


class _G:
    """A global (module, name) written as GLOBAL by the pickler, without importing it."""
    _cache = {}

    def __new__(cls, module, name):
        key = (module, name)
        if key not in cls._cache:
            o = super().__new__(cls)
            o.module, o.name = module, name
            cls._cache[key] = o
        return cls._cache[key]

    def __call__(self, *a):  # save_reduce insists on a callable
        raise TypeError('placeholder')


class _R:
    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


class _Storage:
    def __init__(self, key, values):
        self.key, self.values = key, values


class _Tensor:
    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        n = len(self.storage.values)
        return (_G('torch._utils', '_rebuild_tensor_v2'), (self.storage, 0, (n,), (1,), False, OrderedDict()))


class _CkptPickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ('storage', _G('torch', 'FloatStorage'), str(obj.key), 'cpu', len(obj.values))
        return None

    def _save_g(self, obj):
        self.write(pickle.GLOBAL + (obj.module + '\n' + obj.name + '\n').encode('utf-8'))
        self.memoize(obj)

    dispatch[_G] = _save_g


def np_float64(v):
    dt = _R(_G('numpy', 'dtype'), ('f8', False, True), (3, '<', None, None, None, -1, -1, 0))
    return _R(_G('numpy.core.multiarray', 'scalar'), (dt, struct.pack('<d', float(v))))


def checkpoint_bytes(stem, ckpt_state, plans, configuration, fold, dataset_json):
    storages = []

    def tensor(v):
        s = _Storage(len(storages), [float(v)])
        storages.append(s)
        return _Tensor(s)

    rnd = random.Random(ckpt_state['current_epoch'] * 7919 + K.seed)
    weights = OrderedDict()
    for name in ('encoder.stages.0.0.convs.0.conv.weight', 'encoder.stages.0.0.convs.0.conv.bias',
                 'encoder.stages.0.0.convs.0.norm.weight', 'encoder.stages.0.0.convs.0.norm.bias',
                 'decoder.seg_layers.0.weight', 'decoder.seg_layers.0.bias'):
        weights[name] = tensor(rnd.uniform(-0.1, 0.1))
    opt_state = {i: {'momentum_buffer': tensor(rnd.uniform(-0.01, 0.01))} for i in range(len(weights))}
    lr = ckpt_state['logging']['lrs'][-1] if ckpt_state['logging']['lrs'] else 0.01
    optimizer_state = {'state': opt_state, 'param_groups': [{
        'lr': lr, 'momentum': 0.99, 'dampening': 0, 'weight_decay': 3e-05, 'nesterov': True, 'maximize': False,
        'foreach': None, 'differentiable': False, 'fused': None, 'initial_lr': 0.01,
        'params': list(range(len(weights)))}]}
    best = ckpt_state['_best_ema']
    obj = {
        'network_weights': weights,
        'optimizer_state': optimizer_state,
        'grad_scaler_state': ckpt_state.get('grad_scaler_state'),
        'logging': ckpt_state['logging'],
        '_best_ema': None if best is None else np_float64(best),
        'current_epoch': ckpt_state['current_epoch'],
        'init_args': {'plans': plans, 'configuration': configuration, 'fold': fold, 'dataset_json': dataset_json,
                      'device': _R(_G('torch', 'device'), ('cuda',))},
        'trainer_name': ckpt_state['trainer_name'],
        'inference_allowed_mirroring_axes': ckpt_state.get('inference_allowed_mirroring_axes', (0, 1, 2)),
    }
    buf = io.BytesIO()
    _CkptPickler(buf, protocol=2).dump(obj)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, 'w', compression=zipfile.ZIP_STORED) as z:
        z.writestr(f'{stem}/data.pkl', buf.getvalue())
        for s in storages:
            z.writestr(f'{stem}/data/{s.key}', struct.pack('<%df' % len(s.values), *s.values))
        z.writestr(f'{stem}/version', '3\n')
    return zbuf.getvalue()


class _Placeholder:
    def __init__(self, *a, **k):
        self.args = a

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *a, **k):
        return _Placeholder(*a)


class _DType(_Placeholder):
    pass


def _np_scalar(dtype, data=None):
    code = dtype.args[0] if isinstance(dtype, _DType) and dtype.args else 'f8'
    if isinstance(data, str):
        data = data.encode('latin1')
    fmt = {'f8': '<d', 'f4': '<f', 'i8': '<q', 'i4': '<i', 'b1': '<?'}.get(code)
    if fmt and data is not None and len(data) == struct.calcsize(fmt):
        return struct.unpack(fmt, data)[0]
    return _Placeholder(dtype, data)


class _CkptUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name == 'scalar':
            return _np_scalar
        if module == 'numpy' and name == 'dtype':
            return _DType
        if module == 'torch' and name == 'device':
            return lambda *a: ':'.join(str(x) for x in a)
        if module.split('.')[0] in ('torch', 'numpy'):
            return _Placeholder
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return _Placeholder(*pid)


class CorruptCheckpoint(Exception):
    pass


def load_checkpoint_file(path):
    """Read a torch zip checkpoint without torch. Raises CorruptCheckpoint(<torch 2.x message>)."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CorruptCheckpoint('PytorchStreamReader failed reading zip archive: failed finding central directory')
    with z:
        names = [n for n in z.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
        if not names:
            raise CorruptCheckpoint('PytorchStreamReader failed locating file data.pkl: file not found')
        try:
            return _CkptUnpickler(io.BytesIO(z.read(names[0]))).load()
        except Exception:
            raise CorruptCheckpoint('PytorchStreamReader failed reading file data.pkl: invalid header or archive '
                                    'is corrupted')


PNG_1x1 = (b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + b'IHDR' + struct.pack('>IIBBBBB', 1, 1, 8, 0, 0, 0, 0)
           + struct.pack('>I', zlib.crc32(b'IHDR' + struct.pack('>IIBBBBB', 1, 1, 8, 0, 0, 0, 0)))
           + struct.pack('>I', len(zlib.compress(b'\x00\x00'))) + b'IDAT' + zlib.compress(b'\x00\x00')
           + struct.pack('>I', zlib.crc32(b'IDAT' + zlib.compress(b'\x00\x00')))
           + struct.pack('>I', 0) + b'IEND' + struct.pack('>I', zlib.crc32(b'IEND')))

# ----------------------------------------------------------------------------------------------------------
# worker processes


def _worker_main(worker_id, kind, raise_event, what_value, abort_event, preprocessed_file, ready):
    # forked DA worker: block (no CPU) until told to raise; survive the death of the parent.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if K.real_worker_mib > 0:
        # real host memory, touched page by page (what augmentation buffers cost)
        ballast = bytearray(K.real_worker_mib << 20)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
    ready.set()  # its first batch is ready
    while True:
        raise_event.wait()
        if what_value.value == 2:
            sys.stderr.write('\n'.join([
                'Traceback (most recent call last):',
                f'  File "{PYLIB}/multiprocessing/queues.py", line 264, in _feed',
                '    obj = _ForkingPickler.dumps(obj)',
                '          ^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{PYLIB}/multiprocessing/reduction.py", line 51, in dumps',
                '    cls(buf, protocol).dump(obj)',
                f'  File "{TORCH}/multiprocessing/reductions.py", line 618, in reduce_storage',
                '    fd, size = storage._share_fd_cpu_()',
                '               ^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/storage.py", line 447, in wrapper',
                '    return fn(self, *args, **kwargs)',
                '           ^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/storage.py", line 522, in _share_fd_cpu_',
                '    return super()._share_fd_cpu_(*args, **kwargs)',
                '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                'RuntimeError: unable to write to file </torch_%d_%d_%d>: No space left on device (28)' % (
                    os.getpid(), random.Random(os.getpid()).randrange(10 ** 9, 4 * 10 ** 9), worker_id),
            ]) + '\n')
            sys.stderr.flush()
            os._exit(1)
        msg, exc_line, frames = worker_exception_text(preprocessed_file)
        print('Exception in background worker %d:\n' % worker_id, msg, flush=True)
        sys.stderr.write('\n'.join(['Traceback (most recent call last):'] + frames + [exc_line]) + '\n')
        sys.stderr.flush()
        abort_event.set()
        os._exit(0)


def worker_exception_text(preprocessed_file):
    head = [
        f'  File "{BG_NONDET}", line 61, in producer',
        '    item = next(data_loader)',
        '           ^^^^^^^^^^^^^^^^^',
        f'  File "{BG}/dataloading/data_loader.py", line 126, in __next__',
        '    return self.generate_train_batch()',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{NNU}/training/dataloading/data_loader.py", line 142, in generate_train_batch',
        '    data, seg, seg_prev, properties = self._data.load_case(i)',
        '                                      ^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    # np.load of a preprocessed case with mmap_mode (both numpy failures)
    np_load = [
        f'  File "{NNU}/training/dataloading/nnunet_dataset.py", line 96, in load_case',
        '    data = np.load(data_npy_file, mmap_mode=\'r\')',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{SITE}/numpy/lib/npyio.py", line 453, in load',
        '    return format.open_memmap(file, mode=mmap_mode,',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{SITE}/numpy/lib/format.py", line 945, in open_memmap',
        '    marray = numpy.memmap(filename, dtype=dtype, shape=shape, order=order,',
        '             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    kind = K.worker_exception_kind
    if kind == 'reshape':
        msg = 'cannot reshape array of size 2359296 into shape (1,40,56,40)'
        frames = head + np_load + [
            f'  File "{SITE}/numpy/core/memmap.py", line 289, in __new__',
            '    self = ndarray.__new__(subtype, shape, dtype=descr, buffer=mm,',
            '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        ]
        return msg, 'ValueError: ' + msg, frames
    if kind == 'io':
        msg = "[Errno 5] Input/output error: '%s'" % preprocessed_file
        frames = head + [
            f'  File "{NNU}/training/dataloading/nnunet_dataset.py", line 101, in load_case',
            "    properties = load_pickle(join(self.source_folder, identifier + '.pkl'))",
            '                 ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
            f'  File "{BG}/utilities/file_and_folder_operations.py", line 57, in load_pickle',
            '    with open(file, mode) as f:',
            '         ^^^^^^^^^^^^^^^^',
        ]
        return msg, 'OSError: ' + msg, frames
    msg = 'mmap length is greater than file size'
    frames = head + np_load + [
        f'  File "{SITE}/numpy/core/memmap.py", line 268, in __new__',
        '    mm = mmap.mmap(fid.fileno(), bytes, access=acc, offset=start)',
        '         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    return msg, 'ValueError: ' + msg, frames


def _export_case(path, payload):
    # spawned export Pool worker
    with open(path, 'wb') as f:
        f.write(payload)
    return path


def _metric_case(args):
    case, dice = args
    return case, dice


class Workers:
    """nnUNet_n_proc_DA train workers + max(1, n//2) val workers, forked, daemonic."""

    def __init__(self, n, preprocessed_file):
        self.n_train = n
        self.n_val = max(1, n // 2) if n > 0 else 0
        self.procs = []
        self.events = []
        self.whats = []
        ctx = multiprocessing.get_context('fork')
        self.abort_event = ctx.Event()
        self.ready = []
        for i in range(self.n_train + self.n_val):
            ev = ctx.Event()
            what = ctx.Value('i', 0)
            wid = i if i < self.n_train else i - self.n_train
            ready = ctx.Event()
            self.ready.append(ready)
            p = ctx.Process(target=_worker_main, args=(wid, 'train' if i < self.n_train else 'val', ev, what,
                                                       self.abort_event, preprocessed_file, ready))
            p.daemon = True
            p.start()
            self.procs.append(p)
            self.events.append(ev)
            self.whats.append(what)

    def wait_first_batches(self):
        """get_dataloaders pulls a first batch from each augmenter: wait until
        every worker has one ready, or one of them died trying."""
        for r in self.ready:
            while not r.wait(0.05):
                if not all(self.alive()):
                    return  # the epoch loop reports the dead worker

    def trigger(self, idx, what):
        self.whats[idx].value = 2 if what == 'shm' else 1
        self.events[idx].set()

    def alive(self):
        return [p.is_alive() for p in self.procs]

    def stop(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=2)
        self.procs = []


WORKERS = None

# ----------------------------------------------------------------------------------------------------------
# fatal exits


def block_forever():
    while True:
        time.sleep(3600)


POOLS = []


def finish_process(code):
    """Like interpreter shutdown: multiprocessing's atexit terminates daemonic children."""
    for pool in POOLS:
        # a dead pool worker may hold the task-queue lock: Pool.terminate() could block (b5 of the corpus);
        # kill the workers ourselves and release the pool's semaphores so the resource_tracker stays quiet
        try:
            pool._worker_handler._state = multiprocessing.pool.TERMINATE
            pool._terminate.cancel()
        except Exception:
            pass
        for w in list(pool._pool):
            try:
                os.kill(w.pid, signal.SIGKILL)
            except (OSError, TypeError):
                pass
    for p in multiprocessing.active_children():
        try:
            p.terminate()
        except Exception:
            pass
    for p in multiprocessing.active_children():
        p.join(timeout=2)
    if POOLS:
        try:
            multiprocessing.util._run_finalizers()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fatal(text, noise_threads=(), code=1, force_noise=False):
    """Print a fatal traceback (stderr), then hang (knob) or exit `code` after terminating the workers."""
    err(text)
    if K is not None and (K.shutdown_noise or force_noise) and WORKERS is not None and WORKERS.procs:
        for n in noise_threads or (1, 2):
            err(tb_results_loop_thread(n))
    if GPU is not None:
        GPU.write(own_alive=bool(K and K.hang_after_fatal))
    if K is not None and K.hang_after_fatal:
        block_forever()
    finish_process(code)


def fatal_plain(lines, code=1):
    """Errors before the trainer runs (config errors): no workers yet."""
    err('\n'.join(lines))
    if K is not None and K.hang_after_fatal:
        block_forever()
    sys.exit(code)

# ----------------------------------------------------------------------------------------------------------
# the trainer


def ts():
    return datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')


class Trainer:
    def __init__(self, name, plans, configuration, fold, dataset_json, device, preprocessed_base, results_root):
        self.name = name
        self.plans = plans
        self.configuration_name = configuration
        self.fold = fold
        self.dataset_json = dataset_json
        self.device = device
        self.preprocessed_base = preprocessed_base
        self.config = resolve_configuration(plans, configuration)
        self.output_folder_base = os.path.join(results_root, plans['dataset_name'],
                                               f"{name}__{plans['plans_name']}__{configuration}")
        self.output_folder = os.path.join(self.output_folder_base, f'fold_{fold}')
        self.num_epochs = K.epochs
        self.save_every = K.save_every
        self.current_epoch = 0
        self._best_ema = None
        self.logging = {k: [] for k in ('mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region', 'train_losses',
                                        'val_losses', 'lrs', 'epoch_start_timestamps', 'epoch_end_timestamps')}
        self.disable_checkpointing = False
        self.was_initialized = False
        self.init_plans = plans  # init_args['plans'] (kept from a loaded checkpoint, like nnU-Net)
        labels = dataset_json.get('labels', {'background': 0, 'foreground': 1})
        self.n_fg = max(1, len([k for k in labels if k != 'background']))
        os.makedirs(self.output_folder, exist_ok=True)
        t = datetime.datetime.now()
        self.log_file = os.path.join(self.output_folder, 'training_log_%d_%d_%d_%02d_%02d_%02d.txt' % (
            t.year, t.month, t.day, t.hour, t.minute, t.second))
        out('Using device: %s' % ('cuda:0' if device == 'cuda' else device))
        self.print_to_log_file(
            '\n#######################################################################\n'
            'Please cite the following paper when using nnU-Net:\n'
            'Isensee, F., Jaeger, P. F., Kohl, S. A., Petersen, J., & Maier-Hein, K. H. (2021). nnU-Net: a '
            'self-configuring method for deep learning-based biomedical image segmentation. Nature methods, 18(2), '
            '203-211.\n'
            '#######################################################################\n',
            add_timestamp=False)
        bs = int(self.config['batch_size'])
        ng = max(1, NUM_GPUS)
        self.batch_size = bs // ng + (1 if bs % ng else 0)
        self.compile = device == 'cuda' and (
            'nnUNet_compile' not in os.environ or os.environ['nnUNet_compile'].lower() in ('true', '1', 't'))

    # -- logging
    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        if add_timestamp:
            args = (f'{ts()}:', *args)
        for _ in range(5):
            try:
                with open(self.log_file, 'a+') as f:
                    for a in args:
                        f.write(str(a))
                        f.write(' ')
                    f.write('\n')
                break
            except IOError:
                time.sleep(0.1)
        if also_print_to_console:
            out(*args)

    def initialize(self):
        if not self.was_initialized:
            if self.compile:
                self.print_to_log_file('Using torch.compile...')
            self.was_initialized = True

    # -- splits
    def case_ids(self):
        folder = os.path.join(self.preprocessed_base, self.config.get('data_identifier', ''))
        ids = set()
        if os.path.isdir(folder):
            for fn in os.listdir(folder):
                for ext in ('.b2nd', '.npz', '.npy', '.pkl'):
                    if fn.endswith(ext) and not fn.endswith('_seg' + ext):
                        ids.add(fn[:-len(ext)])
        if not ids:
            n = int(self.dataset_json.get('numTraining', 20))
            ids = {'case_%03d' % i for i in range(n)}
        return sorted(ids)

    def do_split(self):
        if self.fold == 'all':
            keys = self.case_ids()
            return keys, keys
        splits_file = os.path.join(self.preprocessed_base, 'splits_final.json')
        if not os.path.isfile(splits_file):
            self.print_to_log_file('Creating new 5-fold cross-validation split...')
            keys = self.case_ids()
            rnd = random.Random(12345)
            shuffled = keys[:]
            rnd.shuffle(shuffled)
            splits = []
            for k in range(5):
                val = sorted(shuffled[k::5])
                splits.append({'train': sorted(x for x in keys if x not in val), 'val': val})
            with open(splits_file, 'w') as f:
                json.dump(splits, f, indent=4)
        else:
            self.print_to_log_file('Using splits from existing split file:', splits_file)
            with open(splits_file) as f:
                splits = json.load(f)
            self.print_to_log_file(f'The split file contains {len(splits)} splits.')
        self.print_to_log_file('Desired fold for training: %d' % self.fold)
        if self.fold < len(splits):
            tr, val = splits[self.fold]['train'], splits[self.fold]['val']
            self.print_to_log_file('This split has %d training and %d validation cases.' % (len(tr), len(val)))
        else:
            keys = self.case_ids()
            self.print_to_log_file('INFO: You requested fold %d for training but splits contain only %d folds. I am '
                                   'now creating a random (but seeded) 80:20 split!' % (self.fold, len(splits)))
            rnd = random.Random(12345 + self.fold)
            shuffled = keys[:]
            rnd.shuffle(shuffled)
            n_tr = int(len(keys) * 0.8)
            tr, val = sorted(shuffled[:n_tr]), sorted(shuffled[n_tr:])
            self.print_to_log_file('This random 80:20 split has %d training and %d validation cases.'
                                   % (len(tr), len(val)))
        return tr, val

    # -- checkpoints
    def ckpt_state(self):
        return {'logging': copy.deepcopy(self.logging), '_best_ema': self._best_ema,
                'current_epoch': self.current_epoch + 1, 'trainer_name': self.name, 'grad_scaler_state': None,
                'inference_allowed_mirroring_axes': (0, 1, 2) if len(self.config.get('patch_size', [1, 1, 1])) == 3
                else (0, 1)}

    def save_checkpoint(self, filename, kind):
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        stem = os.path.basename(filename)[:-4] if filename.endswith('.pth') else os.path.basename(filename)
        data = checkpoint_bytes(stem, self.ckpt_state(), self.init_plans, self.configuration_name, self.fold,
                                self.dataset_json)
        if K.fail == 'disk_full' and fault_due('disk_full', K.fail_epoch, self.current_epoch):
            once_record('disk_full')
            with open(filename, 'wb') as f:
                f.write(data[:len(data) // 3])
            fatal('\n'.join(tb_run_training() + [
                f'  File "{TRAINER_PY}", line 1431, in run_training',
                '    self.on_epoch_end()',
                f'  File "{TRAINER_PY}", line %d, in on_epoch_end' % (1182 if kind == 'latest' else 1188),
                "    self.save_checkpoint(join(self.output_folder, 'checkpoint_%s.pth'))" % kind,
                f'  File "{TRAINER_PY}", line 1216, in save_checkpoint',
                '    torch.save(checkpoint, filename)',
                f'  File "{TORCH}/serialization.py", line 850, in save',
                '    _save(',
                f'  File "{TORCH}/serialization.py", line 1114, in _save',
                '    zip_file.write_record(name, storage, num_bytes)',
                'OSError: [Errno 28] No space left on device',
            ]))
        if kind == 'latest' and fault_due('truncate', K.truncate_at_epoch, self.current_epoch):
            once_record('truncate')
            with open(filename, 'wb') as f:
                f.write(data[:int(len(data) * 0.6)])
                f.flush()
            if GPU is not None:
                GPU.write()
            os.kill(os.getpid(), signal.SIGKILL)
        with open(filename, 'wb') as f:  # torch.save: not atomic
            f.write(data)

    def load_checkpoint(self, filename):
        self.initialize()
        if K.fail == 'config_weights_only' and not once_fired('config_weights_only'):
            once_record('config_weights_only')
            fatal('\n'.join(tb_entry() + [
                f'  File "{RUN_PY}", line 187, in run_training',
                '    maybe_load_checkpoint(nnunet_trainer, continue_training, only_run_validation, pretrained_weights)',
                f'  File "{RUN_PY}", line 91, in maybe_load_checkpoint',
                '    nnunet_trainer.load_checkpoint(expected_checkpoint_file)',
                f'  File "{TRAINER_PY}", line 1155, in load_checkpoint',
                '    checkpoint = torch.load(filename_or_checkpoint, map_location=self.device)',
                '                 ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/serialization.py", line 1470, in load',
                '    raise pickle.UnpicklingError(_get_wo_message(str(e))) from None',
                '_pickle.UnpicklingError: Weights only load failed. This file can still be loaded, to do so you have '
                'two options, \x1b[1mdo those steps only if you trust the source of the checkpoint\x1b[0m. ',
                '\t(1) In PyTorch 2.6, we changed the default value of the `weights_only` argument in `torch.load` '
                'from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely '
                'succeed, but it can result in arbitrary code execution. Do it only if you got the file from a '
                'trusted source.',
                '\t(2) Alternatively, to load with `weights_only=True` please check the recommended steps in the '
                'following error message.',
                '\tWeightsUnpickler error: Unsupported global: GLOBAL numpy.core.multiarray.scalar was not an allowed '
                'global by default. Please use `torch.serialization.add_safe_globals([scalar])` or the '
                '`torch.serialization.safe_globals([scalar])` context manager to allowlist this global if you trust '
                'this class/function.',
                '',
                'Check the documentation of torch.load to learn more about types accepted by default with '
                'weights_only https://pytorch.org/docs/stable/generated/torch.load.html.',
            ]))
        if not os.path.isfile(filename):
            fatal('\n'.join(tb_entry() + [
                f'  File "{RUN_PY}", line 187, in run_training',
                '    maybe_load_checkpoint(nnunet_trainer, continue_training, only_run_validation, pretrained_weights)',
                f'  File "{RUN_PY}", line 91, in maybe_load_checkpoint',
                '    nnunet_trainer.load_checkpoint(expected_checkpoint_file)',
                f'  File "{TRAINER_PY}", line 1238, in load_checkpoint',
                '    checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)',
                '                 ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/serialization.py", line 1425, in load',
                '    with _open_file_like(f, "rb") as opened_file:',
                '         ^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/serialization.py", line 751, in _open_file_like',
                '    return _open_file(name_or_buffer, mode)',
                '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/serialization.py", line 732, in __init__',
                '    super().__init__(open(name, mode))',
                '                     ^^^^^^^^^^^^^^^^',
                "FileNotFoundError: [Errno 2] No such file or directory: '%s'" % filename,
            ]))
        try:
            ck = load_checkpoint_file(filename)
        except CorruptCheckpoint as e:
            fatal('\n'.join(tb_entry() + [
                f'  File "{RUN_PY}", line 187, in run_training',
                '    maybe_load_checkpoint(nnunet_trainer, continue_training, only_run_validation, pretrained_weights)',
                f'  File "{RUN_PY}", line 91, in maybe_load_checkpoint',
                '    nnunet_trainer.load_checkpoint(expected_checkpoint_file)',
                f'  File "{TRAINER_PY}", line 1238, in load_checkpoint',
                '    checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)',
                '                 ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/serialization.py", line 1432, in load',
                '    with _open_zipfile_reader(opened_file) as opened_zipfile:',
                '         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/serialization.py", line 763, in __init__',
                '    super().__init__(torch._C.PyTorchFileReader(name_or_buffer))',
                '                     ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                'RuntimeError: %s' % e,
            ]))
        self.current_epoch = int(ck.get('current_epoch', 0))
        lg = ck.get('logging') or {}
        for k in self.logging:
            v = lg.get(k)
            self.logging[k] = list(v)[:self.current_epoch] if isinstance(v, (list, tuple)) else []
        be = ck.get('_best_ema')
        self._best_ema = float(be) if isinstance(be, (int, float)) else None
        ia = ck.get('init_args')
        if isinstance(ia, dict) and isinstance(ia.get('plans'), dict):
            self.init_plans = ia['plans']

    # -- metrics
    def epoch_metrics(self, epoch):
        rnd = random.Random('%d-%d' % (K.seed, epoch))
        tau = max(1.0, self.num_epochs / 5.0)
        base = 0.92 - 0.7 * math.exp(-epoch / tau)
        dice = [min(0.995, max(0.0, base - 0.03 * c + rnd.gauss(0, 0.04))) for c in range(self.n_fg)]
        tl = 0.45 - 1.3 * base + rnd.gauss(0, 0.03)
        vl = tl - 0.1 + rnd.gauss(0, 0.03)
        return tl, vl, dice

    # -- the loop
    def on_train_start(self, n_proc_da, resuming_to_end=False):
        global WORKERS
        self.initialize()
        self.print_to_log_file('do_dummy_2d_data_aug: False')
        tr, val = self.do_split()
        self.val_keys = val
        preprocessed_file = os.path.join(self.preprocessed_base, self.config.get('data_identifier', ''),
                                         (tr[0] if tr else 'case_000') + '.pkl')
        if n_proc_da > 0:
            WORKERS = Workers(n_proc_da, preprocessed_file)
            WORKERS.wait_first_batches()
            if self.device == 'cuda':
                out('using pin_memory on device 0')
                out('using pin_memory on device 0')
            # the first batches are pulled here (get_dataloaders): an exception at "epoch 0" of a fresh start
            if (not resuming_to_end and self.current_epoch == 0 and
                    fault_due('worker_exception', K.worker_exception_at_epoch, 0)):
                once_record('worker_exception')
                self.worker_exception(at_startup=True)
        self.print_to_log_file('\nThis is the configuration used by this training:\nConfiguration name: %s\n'
                               % self.configuration_name, self.config, '\n', add_timestamp=False)
        dct = copy.deepcopy(self.plans)
        del dct['configurations']
        self.print_to_log_file('These are the global plan.json settings:\n', dct, '\n', add_timestamp=False)
        with open(os.path.join(self.output_folder_base, 'plans.json'), 'w') as f:
            json.dump(self.plans, f, indent=4)
        with open(os.path.join(self.output_folder_base, 'dataset.json'), 'w') as f:
            json.dump(self.dataset_json, f, indent=4)
        fp = os.path.join(self.preprocessed_base, 'dataset_fingerprint.json')
        if os.path.isfile(fp):
            with open(fp, 'rb') as f:
                data = f.read()
            with open(os.path.join(self.output_folder_base, 'dataset_fingerprint.json'), 'wb') as f:
                f.write(data)
        if self.compile:
            self.print_to_log_file('Unable to plot network architecture: nnUNet_compile is enabled!')
        else:
            self.print_to_log_file('Unable to plot network architecture:')
            self.print_to_log_file("No module named 'hiddenlayer'")
        self.save_debug_json()
        if self.device == 'cuda':
            GPU.own_mib = K.base_mib
            GPU.write()

    def save_debug_json(self):
        dbg = {
            '_best_ema': str(self._best_ema), 'batch_size': str(self.batch_size),
            'configuration_manager': str(self.config), 'configuration_name': self.configuration_name,
            'current_epoch': str(self.current_epoch), 'dataset_json': str(self.dataset_json),
            'device': 'cuda:0' if self.device == 'cuda' else self.device,
            'disable_checkpointing': str(self.disable_checkpointing), 'enable_deep_supervision': 'True',
            'fold': str(self.fold), 'folder_with_segs_from_previous_stage': 'None',
            'gpu_name': 'Simulated GPU' if self.device == 'cuda' else 'None', 'hostname': os.uname().nodename,
            'inference_allowed_mirroring_axes': 'None', 'initial_lr': '0.01', 'is_cascaded': 'False',
            'is_ddp': str(NUM_GPUS > 1), 'local_rank': '0', 'log_file': self.log_file,
            'num_epochs': str(self.num_epochs), 'num_input_channels': '1', 'num_iterations_per_epoch': '250',
            'num_val_iterations_per_epoch': '50', 'output_folder': self.output_folder,
            'output_folder_base': self.output_folder_base, 'oversample_foreground_percent': '0.33',
            'plans_manager': str(self.plans), 'preprocessed_dataset_folder':
                os.path.join(self.preprocessed_base, self.config.get('data_identifier', '')),
            'preprocessed_dataset_folder_base': self.preprocessed_base, 'save_every': str(self.save_every),
            'torch_version': '2.5.1+cu124', 'was_initialized': 'True', 'weight_decay': '3e-05',
        }
        with open(os.path.join(self.output_folder, 'debug.json'), 'w') as f:
            json.dump(dbg, f, sort_keys=True, indent=4)

    def worker_exception(self, at_startup):
        WORKERS.trigger(0, 'exception')
        deadline = time.time() + 5
        while not WORKERS.abort_event.is_set() and time.time() < deadline:
            time.sleep(0.01)
        WORKERS.procs[0].join(timeout=2)
        fatal(tb_main_dead_workers(at_startup=at_startup), noise_threads=(2,))

    def train_for(self, seconds):
        """One epoch's work: batchgenerators' results thread notices a DA worker
        that died (e.g. killed by the kernel's OOM killer) while batches are pulled."""
        deadline = time.time() + seconds
        while True:
            if WORKERS is not None and WORKERS.procs and not all(WORKERS.alive()):
                self.dead_workers_after_kill()
            left = deadline - time.time()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def dead_workers_after_kill(self):
        """The results thread notices the dead child, then the main thread raises."""
        deadline = time.time() + 5
        while all(WORKERS.alive()) and time.time() < deadline:
            time.sleep(0.02)
        err(tb_results_loop_thread(1))
        fatal(tb_main_dead_workers(), noise_threads=(2,))

    def first_iteration_faults(self, epoch):
        """Things that happen at the first training iteration of an epoch."""
        if fault_due('stall', K.stall_at_epoch, epoch):
            once_record('stall')
            if GPU is not None:
                GPU.write()
            block_forever()
        if self.device == 'cuda' and fault_due('xid', K.xid_at_epoch, epoch):
            once_record('xid')
            GPU.xids.append({'xid': 79, 'time': time.time()})
            GPU.write()
            fatal('\n'.join(tb_forward() + [
                f'  File "{SITE}/dynamic_network_architectures/architectures/unet.py", line 62, in forward',
                '    skips = self.encoder(x)',
                '            ^^^^^^^^^^^^^^^',
                'RuntimeError: CUDA error: unknown error',
            ]) + '\n' + CUDA_ASYNC_NOTE)
        # GPU memory
        if self.device == 'cuda':
            need = K.base_mib + self.batch_size * K.sample_mib
            foreign = GPU.foreign_active_mib()
            expandable = 'expandable_segments:true' in os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '').replace(
                ' ', '').lower()
            frag = int(0.35 * K.gpu_mib) if (K.fragmented and not expandable) else 0
            GPU.own_mib = min(need + frag, max(0, K.gpu_mib - foreign))
            GPU.write()
            if epoch >= K.oom_from_epoch and need + frag + foreign > K.gpu_mib:
                self.gpu_oom(need, frag, foreign)
        # host memory
        if WORKERS is not None and WORKERS.procs:
            n_w = len(WORKERS.procs)
            if epoch >= K.host_oom_from_epoch and K.main_mib + n_w * K.worker_mib > K.host_mib:
                os.kill(WORKERS.procs[0].pid, signal.SIGKILL)  # the kernel OOM killer picks a worker
                self.dead_workers_after_kill()
        elif epoch >= K.host_oom_from_epoch and K.main_mib > K.host_mib:
            if GPU is not None:
                GPU.write()
            os.kill(os.getpid(), signal.SIGKILL)
        if WORKERS is not None and WORKERS.procs and fault_due('worker_exception', K.worker_exception_at_epoch,
                                                               epoch):
            once_record('worker_exception')
            self.worker_exception(at_startup=False)
        if K.fail == 'shm_exhausted' and epoch >= K.fail_epoch and WORKERS is not None and \
                WORKERS.n_train > K.shm_workers:
            for i in range(len(WORKERS.procs)):
                WORKERS.trigger(i, 'shm')
            deadline = time.time() + 5
            while any(WORKERS.alive()) and time.time() < deadline:
                time.sleep(0.02)
            self.dead_workers_after_kill()
        if K.fail == 'compile_error' and epoch >= K.fail_epoch and self.compile:
            self.compile_error()
        if K.fail == 'cuda_assert' and fault_due('cuda_assert', K.fail_epoch, epoch):
            once_record('cuda_assert')
            lines = []
            for t in range(4):
                lines.append('../aten/src/ATen/native/cuda/Loss.cu:250: nll_loss_forward_reduce_cuda_kernel_2d: '
                             'block: [0,0,0], thread: [%d,0,0] Assertion `t >= 0 && t < n_classes` failed.' % t)
            err('\n'.join(lines))
            fatal('\n'.join(tb_train_step() + [
                f'  File "{TRAINER_PY}", line 1063, in train_step',
                '    l = self.loss(output, target)',
                '        ^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{TORCH}/nn/modules/module.py", line 1747, in _call_impl',
                '    return forward_call(*args, **kwargs)',
                '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f'  File "{NNU}/training/loss/compound_losses.py", line 56, in forward',
                '    ce_loss = self.ce(net_output, target[:, 0]) \\',
                '              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                'RuntimeError: CUDA error: device-side assert triggered',
            ]) + '\n' + CUDA_ASYNC_NOTE)
        if K.fail == 'cuda_illegal' and fault_due('cuda_illegal', K.fail_epoch, epoch):
            once_record('cuda_illegal')
            fatal('\n'.join(tb_train_step() + [
                f'  File "{TRAINER_PY}", line 1067, in train_step',
                '    l.backward()',
                f'  File "{TORCH}/_tensor.py", line 581, in backward',
                '    torch.autograd.backward(',
                f'  File "{TORCH}/autograd/__init__.py", line 347, in backward',
                '    _engine_run_backward(',
                f'  File "{TORCH}/autograd/graph.py", line 825, in _engine_run_backward',
                '    return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass',
                '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                'RuntimeError: CUDA error: an illegal memory access was encountered',
            ]) + '\n' + CUDA_ASYNC_NOTE)

    def gpu_oom(self, need, frag, foreign):
        total = K.gpu_mib
        tried = K.sample_mib
        free = max(0.0, min(tried * 0.4, total - foreign - (need + frag - tried)))
        in_use = max(0.0, total - foreign - free)
        reserved_unalloc = frag if frag else min(in_use * 0.05, 512)
        allocated = max(0.0, in_use - reserved_unalloc - 400)
        proc_txt = ('Process %d has %s memory in use. ' % (GpuState.FOREIGN_PID, fmt_size(foreign))) if foreign else ''
        msg = ('CUDA out of memory. Tried to allocate %s. GPU 0 has a total capacity of %s of which %s is free. '
               '%sIncluding non-PyTorch memory, this process has %s memory in use. Of the allocated memory %s is '
               'allocated by PyTorch, and %s is reserved by PyTorch but unallocated. If reserved but unallocated '
               'memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.'
               '  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html'
               '#environment-variables)') % (fmt_size(tried), fmt_size(total), fmt_size(free), proc_txt,
                                              fmt_size(in_use), fmt_size(allocated), fmt_size(reserved_unalloc))
        fatal('\n'.join(tb_forward() + [
            f'  File "{SITE}/dynamic_network_architectures/architectures/unet.py", line 64, in forward',
            '    return self.decoder(skips)',
            '           ^^^^^^^^^^^^^^^^^^^',
            f'  File "{TORCH}/nn/modules/module.py", line 1747, in _call_impl',
            '    return forward_call(*args, **kwargs)',
            '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
            f'  File "{SITE}/dynamic_network_architectures/building_blocks/unet_decoder.py", line 103, in forward',
            '    x = self.stages[s](x)',
            '        ^^^^^^^^^^^^^^^^^',
            f'  File "{TORCH}/nn/modules/conv.py", line 725, in _conv_forward',
            '    return F.conv3d(',
            '           ^^^^^^^^^',
            'torch.OutOfMemoryError: ' + msg,
        ]))

    def compile_error(self):
        rnd = random.Random(K.seed)
        tmp = '/tmp/tmp%s' % ''.join(rnd.choice('abcdefghijklmnopqrstuvwxyz0123456789_') for _ in range(8))
        err('%s/main.c:5:10: fatal error: Python.h: No such file or directory\n'
            '    5 | #include <Python.h>\n      |          ^~~~~~~~~~\ncompilation terminated.' % tmp)
        fatal('\n'.join(tb_forward() + [
            f'  File "{TORCH}/_dynamo/eval_frame.py", line 465, in _fn',
            '    return fn(*args, **kwargs)',
            '           ^^^^^^^^^^^^^^^^^^^',
            f'  File "{TORCH}/_dynamo/convert_frame.py", line 1269, in __call__',
            '    return self._torchdynamo_orig_callable(',
            f'  File "{TORCH}/_dynamo/output_graph.py", line 1465, in _call_user_compiler',
            '    raise BackendCompilerFailed(self.compiler_fn, e) from e',
            "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:",
            "CalledProcessError: Command '['/usr/bin/gcc', '%s/main.c', '-O3', '-shared', '-fPIC', '-o', "
            "'%s/cuda_utils.cpython-311-x86_64-linux-gnu.so', '-lcuda', '-L%s/triton/backends/nvidia/lib', "
            "'-L/lib/x86_64-linux-gnu', '-I%s/triton/backends/nvidia/include', '-I%s', "
            "'-I/usr/include/python3.11']' returned non-zero exit status 1." % (tmp, tmp, SITE, SITE, tmp),
            '',
            'Set TORCH_LOGS="+dynamo" and TORCHDYNAMO_VERBOSE=1 for more information',
            '',
            '',
            'You can suppress this exception and fall back to eager by setting:',
            '    import torch._dynamo',
            '    torch._dynamo.config.suppress_errors = True',
            '',
        ]), noise_threads=(1, 2), force_noise=True)

    def run_training(self, n_proc_da):
        resuming_to_end = self.current_epoch >= self.num_epochs
        self.on_train_start(n_proc_da, resuming_to_end)
        nan_from = None
        if K.fail == 'nan_loss' and not once_fired('nan_loss'):
            nan_from = K.fail_epoch
        for epoch in range(self.current_epoch, self.num_epochs):
            self.current_epoch = epoch
            # on_train_epoch_start
            lr = round(0.01 * (1 - epoch / self.num_epochs) ** 0.9, 5)
            self.logging['lrs'].append(lr)
            self.print_to_log_file('')
            self.print_to_log_file(f'Epoch {epoch}')
            self.print_to_log_file(f'Current learning rate: {lr}')
            start = time.time()
            self.logging['epoch_start_timestamps'].append(start)
            self.first_iteration_faults(epoch)
            if K.epoch_seconds > 0:
                self.train_for(K.epoch_seconds)
            tl, vl, dice = self.epoch_metrics(epoch)
            if nan_from is not None and epoch >= nan_from:
                once_record('nan_loss')
                tl, vl, dice = float('nan'), float('nan'), [0.0] * self.n_fg
            # on_epoch_end
            end = time.time()
            self.logging['epoch_end_timestamps'].append(end)
            self.logging['train_losses'].append(tl)
            self.logging['val_losses'].append(vl)
            self.logging['dice_per_class_or_region'].append(dice)
            mean = sum(dice) / len(dice)
            self.logging['mean_fg_dice'].append(mean)
            ema = self.logging['ema_fg_dice'][-1] * 0.9 + 0.1 * mean if self.logging['ema_fg_dice'] else mean
            self.logging['ema_fg_dice'].append(ema)
            self.print_to_log_file('train_loss', round(tl, 4))
            self.print_to_log_file('val_loss', round(vl, 4))
            self.print_to_log_file('Pseudo dice', [round(d, 4) for d in dice])
            self.print_to_log_file(f'Epoch time: {round(end - start, 2)} s')
            if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
                self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_latest.pth'), 'latest')
            if self._best_ema is None or ema > self._best_ema:
                self._best_ema = ema
                self.print_to_log_file(f'Yayy! New best EMA pseudo Dice: {round(self._best_ema, 4)}')
                self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_best.pth'), 'best')
            if fault_due('crash', K.crash_at_epoch, epoch):
                once_record('crash')
                fatal('\n'.join(tb_run_training() + [
                    f'  File "{TRAINER_PY}", line 1431, in run_training',
                    '    self.on_epoch_end()',
                    f'  File "{TRAINER_PY}", line 1191, in on_epoch_end',
                    '    self.logger.plot_progress_png(self.output_folder)',
                    f'  File "{NNU}/training/logging/nnunet_logger.py", line 96, in plot_progress_png',
                    "    ax.plot(x_values, self.my_fantastic_logging['ema_fg_dice'][:epoch + 1], color='g', ls='-', "
                    "label=\"pseudo dice (mov. avg.)\", linewidth=4)",
                    '                      ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~^^^^^^^^^^^^',
                    'IndexError: list index out of range',
                ]))
            with open(os.path.join(self.output_folder, 'progress.png'), 'wb') as f:
                f.write(PNG_1x1)
            self.current_epoch = epoch + 1
            if self.device == 'cuda':
                GPU.write()
        # on_train_end
        self.current_epoch = self.num_epochs - 1
        self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_final.pth'), 'final')
        self.current_epoch = self.num_epochs
        latest = os.path.join(self.output_folder, 'checkpoint_latest.pth')
        if os.path.isfile(latest):
            os.remove(latest)
        if WORKERS is not None:
            WORKERS.stop()
        self.print_to_log_file('Training done.')
        if self.device == 'cuda':
            GPU.own_mib = K.base_mib
            GPU.write()

    def perform_actual_validation(self, npz):
        if self.device != 'cuda':
            out('perform_everything_on_device=True is only supported for cuda devices! Setting this to False')
        def_n_proc = _env_int('nnUNet_def_n_proc', 8)
        n_pool = max(1, min(def_n_proc, K.max_pool))
        ctx = multiprocessing.get_context('spawn')
        pool = ctx.Pool(n_pool)
        POOLS.append(pool)
        worker_list = list(pool._pool)
        validation_folder = os.path.join(self.output_folder, 'validation')
        os.makedirs(validation_folder, exist_ok=True)
        _, val_keys = self.do_split()
        keys = val_keys[:K.val_cases] if K.val_cases else []
        ending = self.dataset_json.get('file_ending', '.nii.gz')
        results = []
        kill_at = min(2, len(keys) - 1) if keys else -1
        fail_export = K.fail == 'validation_export' and def_n_proc > K.export_procs_ok
        shape = [1] + list(self.config.get('median_image_size_in_voxels', [40, 56, 40]))
        shape = [int(round(s)) for s in shape]
        for i, k in enumerate(keys):
            if not all(p.is_alive() for p in worker_list):
                self.export_pool_dead()
            self.print_to_log_file(f'predicting {k}')
            self.print_to_log_file(f'{k}, shape torch.Size({shape}), rank 0')
            if fault_due('stall_validation', K.stall_in_validation, i) and i == K.stall_in_validation:
                once_record('stall_validation')
                block_forever()
            if K.val_case_seconds > 0:
                time.sleep(K.val_case_seconds)
            payload = b'sim-prediction ' + k.encode()
            results.append(pool.apply_async(_export_case, (os.path.join(validation_folder, k + ending), payload)))
            if npz:
                results.append(pool.apply_async(_export_case, (os.path.join(validation_folder, k + '.npz'),
                                                               payload)))
                results.append(pool.apply_async(_export_case, (os.path.join(validation_folder, k + '.pkl'),
                                                               payload)))
            if fail_export and i == kill_at:
                # an export worker gets killed (host RAM during resampling). The pool's handler thread would
                # start a replacement; stop it first so that no half-started spawn child is left at exit.
                pool._worker_handler._state = multiprocessing.pool.TERMINATE
                time.sleep(0.25)
                os.kill(worker_list[0].pid, signal.SIGKILL)
                deadline = time.time() + 5
                while worker_list[0].is_alive() and time.time() < deadline:
                    time.sleep(0.02)
                self.export_pool_dead()
        for r in results:
            r.get(timeout=60)
        pool.close()
        pool.join()
        POOLS.remove(pool)
        # compute_metrics_on_folder: its own pool
        rnd = random.Random('val-%d' % K.seed)
        per_case = []
        base = self.logging['mean_fg_dice'][-1] if self.logging['mean_fg_dice'] else 0.8
        if base != base:  # nan
            base = 0.0
        dices = []
        if keys:
            with ctx.Pool(n_pool) as mpool:
                dices = mpool.map(_metric_case, [(k, [min(1.0, max(0.0, base + rnd.gauss(0.02, 0.03)))
                                                      for _ in range(self.n_fg)]) for k in keys])
        for k, d in dices:
            per_case.append({'metrics': {str(c + 1): {'Dice': d[c], 'FN': 10, 'FP': 12, 'IoU': d[c] / (2 - d[c]),
                                                      'TN': 100000, 'TP': 900, 'n_pred': 912, 'n_ref': 910}
                                         for c in range(self.n_fg)},
                             'prediction_file': os.path.join(validation_folder, k + ending),
                             'reference_file': os.path.join(self.preprocessed_base, 'gt_segmentations', k + ending)})
        means = {}
        for c in range(self.n_fg):
            vals = [pc['metrics'][str(c + 1)]['Dice'] for pc in per_case]
            means[str(c + 1)] = {'Dice': sum(vals) / len(vals) if vals else float('nan')}
        fg = [m['Dice'] for m in means.values()]
        fg_mean = sum(fg) / len(fg) if fg else float('nan')
        summary = {'foreground_mean': {'Dice': fg_mean}, 'mean': means, 'metric_per_case': per_case}
        with open(os.path.join(validation_folder, 'summary.json'), 'w') as f:
            json.dump(summary, f, sort_keys=True, indent=4)
        self.print_to_log_file('Validation complete', also_print_to_console=True)
        self.print_to_log_file('Mean Validation Dice: ', fg_mean, also_print_to_console=True)

    def export_pool_dead(self):
        fatal('\n'.join(tb_entry() + [
            f'  File "{RUN_PY}", line 204, in run_training',
            '    nnunet_trainer.perform_actual_validation(export_validation_probabilities)',
            f'  File "{TRAINER_PY}", line 1305, in perform_actual_validation',
            '    proceed = not check_workers_alive_and_busy(segmentation_export_pool, worker_list, results,',
            '                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
            f'  File "{NNU}/utilities/file_path_utilities.py", line 101, in check_workers_alive_and_busy',
            "    raise RuntimeError('Some background workers are no longer alive')",
            'RuntimeError: Some background workers are no longer alive',
        ]), noise_threads=())

# ----------------------------------------------------------------------------------------------------------
# plans / dataset resolution


def resolve_configuration(plans, name, visited=None):
    if name not in plans['configurations']:
        raise ValueError(f'The configuration {name} does not exist in the plans I have. Valid configuration names '
                         f'are {list(plans["configurations"].keys())}.')
    configuration = copy.deepcopy(plans['configurations'][name])
    if 'inherits_from' in configuration:
        parent = configuration['inherits_from']
        if visited is None:
            visited = (name,)
        else:
            if parent in visited:
                raise RuntimeError(f'Circular dependency detected. The following configurations were visited while '
                                   f'solving inheritance (in that order!): {visited}. Current configuration: {name}. '
                                   f'Its parent configuration is {parent}.')
            visited = (*visited, name)
        base = resolve_configuration(plans, parent, visited)
        base.update(configuration)
        configuration = base
    return configuration


ENV_TEXT = {
    'nnUNet_raw': 'nnUNet_raw is not defined and nnU-Net can only be used on data for which preprocessed files are '
                  'already present on your system. nnU-Net cannot be used for experiment planning and preprocessing '
                  'like this. If this is not intended, please read documentation/setting_up_paths.md for '
                  'information on how to set this up properly.',
    'nnUNet_preprocessed': 'nnUNet_preprocessed is not defined and nnU-Net can not be used for preprocessing or '
                           'training. If this is not intended, please read documentation/setting_up_paths.md for '
                           'information on how to set this up.',
    'nnUNet_results': 'nnUNet_results is not defined and nnU-Net cannot be used for training or inference. If this '
                      'is not intended behavior, please read documentation/setting_up_paths.md for information on '
                      'how to set this up.',
}


def tb_get_trainer():
    return tb_entry() + [
        f'  File "{RUN_PY}", line 180, in run_training',
        '    nnunet_trainer = get_trainer_from_args(dataset_name_or_id, configuration, fold, trainer_class_name,',
        '                     ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]


def env_path(var, frames):
    v = os.environ.get(var)
    if v is None or v == '':
        fatal_plain(frames + [
            f'  File "{NNU}/paths.py", line 38, in __fspath__',
            '    raise RuntimeError(',
            'RuntimeError: ' + ENV_TEXT[var],
        ])
    return v


def convert_to_dataset_name(ds):
    frames = tb_get_trainer() + [
        f'  File "{RUN_PY}", line 53, in get_trainer_from_args',
        '    preprocessed_dataset_folder_base = join(nnUNet_preprocessed, '
        'maybe_convert_to_dataset_name(dataset_name_or_id))',
        '                                                                 '
        '^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    pre = env_path('nnUNet_preprocessed', frames)
    raw = env_path('nnUNet_raw', frames)
    res = env_path('nnUNet_results', frames)
    if isinstance(ds, str) and ds.startswith('Dataset'):
        return ds, pre
    ds_id = int(ds)
    prefix = 'Dataset%03d' % ds_id
    cands = set()
    for base in (pre, raw, res):
        if os.path.isdir(base):
            for d in os.listdir(base):
                if d.startswith(prefix) and os.path.isdir(os.path.join(base, d)):
                    cands.add(d)
    frames2 = frames + [
        f'  File "{NNU}/utilities/dataset_name_id_conversion.py", line 74, in maybe_convert_to_dataset_name',
        '    return convert_id_to_dataset_name(dataset_name_or_id)',
        '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    if len(cands) > 1:
        fatal_plain(frames2 + [
            f'  File "{NNU}/utilities/dataset_name_id_conversion.py", line 48, in convert_id_to_dataset_name',
            '    raise RuntimeError("More than one dataset name found for dataset id %d. Please correct that. (I looked '
            'in the "',
            'RuntimeError: More than one dataset name found for dataset id %d. Please correct that. (I looked in the '
            'following folders:\n%s\n%s\n%s' % (ds_id, raw, pre, res)])
    if not cands:
        fatal_plain(frames2 + [
            f'  File "{NNU}/utilities/dataset_name_id_conversion.py", line 51, in convert_id_to_dataset_name',
            '    raise RuntimeError(f"Could not find a dataset with the ID {dataset_id}. Make sure the requested '
            'dataset ID "',
            f'RuntimeError: Could not find a dataset with the ID {ds_id}. Make sure the requested dataset ID exists '
            f'and that nnU-Net knows where raw and preprocessed data are located (see Documentation - '
            f'Installation). Here are your currently defined folders:\nnnUNet_preprocessed={pre}\n'
            f'nnUNet_results={res}\nnnUNet_raw={raw}\nIf something is not right, adapt your environment variables.'])
    return sorted(cands)[0], pre


def load_json_or_die(path, frames):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        fatal_plain(frames + [
            f'  File "{BG}/utilities/file_and_folder_operations.py", line 68, in load_json',
            "    with open(file, 'r') as f:",
            '         ^^^^^^^^^^^^^^^^',
            "FileNotFoundError: [Errno 2] No such file or directory: '%s'" % path,
        ])
    except ValueError as e:
        fatal_plain(frames + [
            f'  File "{BG}/utilities/file_and_folder_operations.py", line 69, in load_json',
            '    a = json.load(f)',
            '        ^^^^^^^^^^^^',
            'json.decoder.JSONDecodeError: %s' % e,
        ])

# ----------------------------------------------------------------------------------------------------------
# entry point


NUM_GPUS = 1


def trainer_known(name):
    return name.startswith('nnUNetTrainer') or name in K.trainers


def build_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument('dataset_name_or_id', type=str, help='Dataset name or ID to train with')
    parser.add_argument('configuration', type=str, help='Configuration that should be trained')
    parser.add_argument('fold', type=str,
                        help='Fold of the 5-fold cross-validation. Should be an int between 0 and 4.')
    parser.add_argument('-tr', type=str, required=False, default='nnUNetTrainer',
                        help='[OPTIONAL] Use this flag to specify a custom trainer. Default: nnUNetTrainer')
    parser.add_argument('-p', type=str, required=False, default='nnUNetPlans',
                        help='[OPTIONAL] Use this flag to specify a custom plans identifier. Default: nnUNetPlans')
    parser.add_argument('-pretrained_weights', type=str, required=False, default=None,
                        help='[OPTIONAL] path to nnU-Net checkpoint file to be used as pretrained model. Will only '
                             'be used when actually training. Beta. Use with caution.')
    parser.add_argument('-num_gpus', type=int, default=1, required=False,
                        help='Specify the number of GPUs to use for training')
    parser.add_argument('--npz', action='store_true', required=False,
                        help='[OPTIONAL] Save softmax predictions from final validation as npz files (in addition to '
                             'predicted segmentations). Needed for finding the best ensemble.')
    parser.add_argument('--c', action='store_true', required=False,
                        help='[OPTIONAL] Continue training from latest checkpoint')
    parser.add_argument('--val', action='store_true', required=False,
                        help='[OPTIONAL] Set this flag to only run the validation. Requires training to have '
                             'finished.')
    parser.add_argument('--val_best', action='store_true', required=False,
                        help="[OPTIONAL] If set, the validation will be performed with the checkpoint_best instead "
                             "of checkpoint_final. NOT COMPATIBLE with --disable_checkpointing! WARNING: This will "
                             "use the same 'validation' folder as the regular validation with no way of "
                             "distinguishing the two!")
    parser.add_argument('--disable_checkpointing', action='store_true', required=False,
                        help='[OPTIONAL] Set this flag to disable checkpointing. Ideal for testing things out and you '
                             'dont want to flood your hard drive with checkpoints.')
    parser.add_argument('-device', type=str, default='cuda', required=False,
                        help="Use this to set the device the training should run with. Available options are 'cuda' "
                             "(GPU), 'cpu' (CPU) and 'mps' (Apple M1/M2). Do NOT use this to set which GPU ID! Use "
                             "CUDA_VISIBLE_DEVICES=X nnUNetv2_train [...] instead!")
    return parser


def on_sigint(signum, frame):
    err('\n'.join(tb_train_step() + [
        f'  File "{TRAINER_PY}", line 1066, in train_step',
        '    l.backward()',
        f'  File "{TORCH}/_tensor.py", line 581, in backward',
        '    torch.autograd.backward(',
        'KeyboardInterrupt']))
    for p in multiprocessing.active_children():
        try:
            p.terminate()
        except Exception:
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def main(argv=None):
    global K, GPU, NUM_GPUS
    K = Knobs()
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGINT, on_sigint)
    if args.device not in ('cpu', 'cuda', 'mps'):
        fatal_plain(['Traceback (most recent call last):',
                     f'  File "{VENV}/bin/nnUNetv2_train", line 8, in <module>',
                     '    sys.exit(run_training_entry())',
                     '             ^^^^^^^^^^^^^^^^^^^^',
                     f'  File "{RUN_PY}", line 246, in run_training_entry',
                     "    assert args.device in ['cpu', 'cuda', 'mps'], f'-device must be either cpu, mps or cuda. "
                     "Other devices are not tested/supported. Got: {args.device}.'",
                     '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                     'AssertionError: -device must be either cpu, mps or cuda. Other devices are not tested/supported. '
                     'Got: %s.' % args.device])
    GPU = GpuState()
    NUM_GPUS = args.num_gpus
    if args.p == 'nnUNetPlans':
        out('\n############################\nINFO: You are using the old nnU-Net default plans. We have updated our '
            'recommendations. Please consider using those instead! Read more here: '
            'https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/resenc_presets.md'
            '\n############################\n')
    fold = args.fold
    if fold != 'all':
        try:
            fold = int(fold)
        except ValueError:
            out(f'Unable to convert given value for fold to int: {fold}. fold must bei either "all" or an integer!')
            fatal_plain(tb_entry() + [
                f'  File "{RUN_PY}", line 150, in run_training',
                '    fold = int(fold)',
                '           ^^^^^^^^^',
                f"ValueError: invalid literal for int() with base 10: '{fold}'"])
    if args.val_best and args.disable_checkpointing:
        fatal_plain(tb_entry() + [
            f'  File "{RUN_PY}", line 157, in run_training',
            "    assert not disable_checkpointing, '--val_best is not compatible with --disable_checkpointing'",
            '           ^^^^^^^^^^^^^^^^^^^^^^^^^',
            'AssertionError: --val_best is not compatible with --disable_checkpointing'])
    if args.num_gpus > 1 and args.device != 'cuda':
        fatal_plain(tb_entry() + [
            f'  File "{RUN_PY}", line 160, in run_training',
            '    assert device.type == \'cuda\', f"DDP training (triggered by num_gpus > 1) is only implemented for '
            'cuda devices. Your device: {device}"',
            'AssertionError: DDP training (triggered by num_gpus > 1) is only implemented for cuda devices. Your '
            'device: %s' % args.device])
    # get_trainer_from_args
    if not trainer_known(args.tr):
        fatal_plain(tb_get_trainer() + [
            f'  File "{RUN_PY}", line 43, in get_trainer_from_args',
            "    raise RuntimeError(f'Could not find requested nnunet trainer {trainer_name} in '",
            f'RuntimeError: Could not find requested nnunet trainer {args.tr} in nnunetv2.training.nnUNetTrainer '
            f'({NNU}/training/nnUNetTrainer). If it is located somewhere else, please move it there.'])
    ds = args.dataset_name_or_id
    if not ds.startswith('Dataset'):
        try:
            int(ds)
        except ValueError:
            fatal_plain(tb_get_trainer() + [
                f'  File "{RUN_PY}", line 52, in get_trainer_from_args',
                "    raise ValueError(f'dataset_name_or_id must either be an integer or a valid dataset name with "
                "the pattern '",
                f'ValueError: dataset_name_or_id must either be an integer or a valid dataset name with the pattern '
                f'DatasetXXX_YYY where XXX are the three(!) task ID digits. Your input: {ds}'])
    dataset_name, pre = convert_to_dataset_name(ds)
    frames = tb_get_trainer() + [
        f'  File "{RUN_PY}", line 56, in get_trainer_from_args',
        '    plans = load_json(plans_file)',
        '            ^^^^^^^^^^^^^^^^^^^^^',
    ]
    pre_base = os.path.join(pre, dataset_name)
    plans = load_json_or_die(os.path.join(pre_base, args.p + '.json'), frames)
    frames_ds = tb_get_trainer() + [
        f'  File "{RUN_PY}", line 57, in get_trainer_from_args',
        "    dataset_json = load_json(join(preprocessed_dataset_folder_base, 'dataset.json'))",
        '                   ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    dataset_json = load_json_or_die(os.path.join(pre_base, 'dataset.json'), frames_ds)
    frames_init = tb_get_trainer() + [
        f'  File "{RUN_PY}", line 58, in get_trainer_from_args',
        '    nnunet_trainer = nnunet_trainer(plans=plans, configuration=configuration, fold=fold,',
        '                     ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
        f'  File "{TRAINER_PY}", line 125, in __init__',
        '    self.configuration_manager = self.plans_manager.get_configuration(configuration)',
        '                                 ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    ]
    if not isinstance(plans.get('configurations'), dict) or args.configuration not in plans['configurations']:
        fatal_plain(frames_init + [
            f'  File "{NNU}/utilities/plans_handling/plans_handler.py", line 257, in get_configuration',
            '    raise RuntimeError(f"Requested configuration {configuration_name} not found in plans. "',
            f"RuntimeError: Requested configuration {args.configuration} not found in plans. Available "
            f"configurations: {list((plans.get('configurations') or {}).keys())}"])
    try:
        resolve_configuration(plans, args.configuration)
    except (RuntimeError, ValueError) as e:
        fatal_plain(frames_init + [
            f'  File "{NNU}/utilities/plans_handling/plans_handler.py", line 250, in '
            f'_internal_resolve_configuration_inheritance',
            '    raise RuntimeError(f"Circular dependency detected. The following configurations were visited "',
            f'{type(e).__name__}: {e}'])
    results = env_path('nnUNet_results', frames_init)
    trainer = Trainer(args.tr, plans, args.configuration, fold, dataset_json, args.device, pre_base, results)
    if args.disable_checkpointing:
        trainer.disable_checkpointing = True
    if args.device == 'cuda':
        GPU.own_mib = K.base_mib  # CUDA context + model
        GPU.write()
    if args.c and args.val:
        fatal_plain(tb_entry() + [
            f'  File "{RUN_PY}", line 191, in run_training',
            "    assert not (continue_training and only_run_validation), f'Cannot set --c and --val flag at the same "
            "time. Dummy.'",
            'AssertionError: Cannot set --c and --val flag at the same time. Dummy.'])
    # maybe_load_checkpoint
    frames_mlc = tb_entry() + [
        f'  File "{RUN_PY}", line 193, in run_training',
        '    maybe_load_checkpoint(nnunet_trainer, continue_training, only_run_validation, pretrained_weights)',
    ]
    ckpt = None
    if args.c and args.pretrained_weights is not None:
        fatal_plain(frames_mlc + [
            f'  File "{RUN_PY}", line 66, in maybe_load_checkpoint',
            "    raise RuntimeError('Cannot both continue a training AND load pretrained weights. Pretrained weights "
            "can only '",
            'RuntimeError: Cannot both continue a training AND load pretrained weights. Pretrained weights can only '
            'be used at the beginning of the training.'])
    if args.c:
        ckpt = os.path.join(trainer.output_folder, 'checkpoint_final.pth')
        if not os.path.isfile(ckpt):
            ckpt = os.path.join(trainer.output_folder, 'checkpoint_latest.pth')
        if not os.path.isfile(ckpt):
            ckpt = os.path.join(trainer.output_folder, 'checkpoint_best.pth')
        if not os.path.isfile(ckpt):
            out('WARNING: Cannot continue training because there seems to be no checkpoint available to continue '
                'from. Starting a new training...')
            if K.version not in ('2.0', '2.1'):
                ckpt = None
    elif args.val:
        ckpt = os.path.join(trainer.output_folder, 'checkpoint_final.pth')
        if not os.path.isfile(ckpt):
            fatal_plain(frames_mlc + [
                f'  File "{RUN_PY}", line 82, in maybe_load_checkpoint',
                '    raise RuntimeError(f"Cannot run validation because the training is not finished yet!")',
                'RuntimeError: Cannot run validation because the training is not finished yet!'])
    elif args.pretrained_weights is not None:
        trainer.initialize()
        pw = args.pretrained_weights
        if not os.path.isfile(pw):
            fatal_plain(frames_mlc + [
                f'  File "{RUN_PY}", line 88, in maybe_load_checkpoint',
                '    load_pretrained_weights(nnunet_trainer.network, pretrained_weights_file, verbose=True)',
                f'  File "{NNU}/run/load_pretrained_weights.py", line 22, in load_pretrained_weights',
                "    saved_model = torch.load(fname, weights_only=False)",
                '                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
                f"FileNotFoundError: [Errno 2] No such file or directory: '{pw}'"])
        out('################### Loading pretrained weights from file ', pw, '###################')
        out('Below is the list of overlapping blocks in pretrained model and nnUNet architecture:')
        out('encoder.stages.0.0.convs.0.conv.weight shape torch.Size([32, 1, 3, 3, 3])')
        out('################### Done ###################')
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
    n_proc_da = _env_int('nnUNet_n_proc_DA', min(12, os.cpu_count() or 1))
    if not args.val:
        trainer.run_training(max(0, n_proc_da))
    if args.val_best:
        trainer.load_checkpoint(os.path.join(trainer.output_folder, 'checkpoint_best.pth'))
    trainer.perform_actual_validation(args.npz)
    if GPU is not None:
        GPU.write(own_alive=False)
    finish_process(0)


if __name__ == '__main__':
    main()
