"""Fidelity tests of the simulated nnUNetv2_train against the real logs in ../shared/corpus/nnunet-cpu.

Run from the repository root:  python3 -m unittest discover -s sim -p 'test_*.py'
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.join(REPO, '..', 'shared')
CORPUS = os.path.join(SHARED, 'corpus', 'nnunet-cpu')
FIXTURES = os.path.join(SHARED, 'fixtures', 'checkpoints')
SIM = os.path.join(HERE, 'nnunetv2_train.py')
TS = r'\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}: '


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


simmod = _load('nnguard_sim_train', SIM)
mktree = _load('nnguard_sim_mktree', os.path.join(HERE, 'mktree.py'))

KINDS = [
    ('blank_ts', re.compile('^' + TS + '$')),
    ('epoch', re.compile('^' + TS + r'Epoch \d+$')),
    ('lr', re.compile('^' + TS + r'Current learning rate: [0-9.e-]+$')),
    ('train_loss', re.compile('^' + TS + r'train_loss (-?[0-9.]+(e-?\d+)?|nan)$')),
    ('val_loss', re.compile('^' + TS + r'val_loss (-?[0-9.]+(e-?\d+)?|nan)$')),
    ('pseudo', re.compile('^' + TS + r'Pseudo dice \[[0-9., ]+\]$')),
    ('epoch_time', re.compile('^' + TS + r'Epoch time: [0-9.]+ s$')),
    ('yayy', re.compile('^' + TS + r'Yayy! New best EMA pseudo Dice: [0-9.]+$')),
    ('done', re.compile('^' + TS + r'Training done\.$')),
    ('predicting', re.compile('^' + TS + r'predicting \S+$')),
    ('shape', re.compile('^' + TS + r'\S+, shape torch\.Size\(\[[0-9, ]+\]\), rank 0$')),
    ('val_complete', re.compile('^' + TS + r'Validation complete$')),
    ('mean_dice', re.compile('^' + TS + r'Mean Validation Dice:  [0-9.]+$')),
    ('split_existing', re.compile('^' + TS + r'Using splits from existing split file: \S+splits_final\.json$')),
    ('split_new', re.compile('^' + TS + r'Creating new 5-fold cross-validation split\.\.\.$')),
    ('split_count', re.compile('^' + TS + r'The split file contains 5 splits\.$')),
    ('fold', re.compile('^' + TS + r'Desired fold for training: \d+$')),
    ('split_sizes', re.compile('^' + TS + r'This split has \d+ training and \d+ validation cases\.$')),
    ('dummy2d', re.compile('^' + TS + r'do_dummy_2d_data_aug: (True|False)$')),
    ('plot1', re.compile('^' + TS + r'Unable to plot network architecture:$')),
    ('plot2', re.compile('^' + TS + r"No module named 'hiddenlayer'$")),
    ('config_dict', re.compile(r"^ \{'data_identifier': .*'batch_size': \d+, .*\} $")),
    ('plans_dict', re.compile(r"^ \{'dataset_name': 'Dataset\d{3}_\w+', 'plans_name': .*\} $")),
    ('ts_other', re.compile('^' + TS)),
    ('blank', re.compile('^$')),
    ('other', re.compile('.*')),
]


def kind(line):
    for name, rx in KINDS:
        if rx.match(line):
            return name
    return 'other'


def kinds(text):
    out = [kind(l) for l in text.split('\n')]
    while out and out[-1] == 'blank':
        out.pop()
    return out


def collapse(seq):
    """Startup kinds, one epoch's kinds (without the optional yayy) and the validation tail."""
    first_epoch = seq.index('epoch') - 1
    startup = seq[:first_epoch]
    done = seq.index('done')
    epochs = [k for k in seq[first_epoch:done] if k != 'yayy']
    tail = []
    for k in seq[done:]:
        if k in ('predicting', 'shape') and tail[-2:] == ['predicting', 'shape'] and k == 'predicting':
            continue
        if k == 'shape' and tail and tail[-1] == 'shape':
            continue
        if not (k == 'shape' and tail[-1:] == ['shape']):
            tail.append(k)
    # drop repeated predicting/shape pairs
    compact = []
    for k in tail:
        if k in ('predicting', 'shape') and k in compact:
            continue
        compact.append(k)
    return startup, epochs, compact


def children_of(pid):
    kids = []
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(')') + 2:].split()
        if int(fields[1]) == pid and fields[0] != 'Z':
            kids.append(int(d))
    return kids


def alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rindex(')') + 2:].split()[0] != 'Z'


def read_ckpt(path):
    return simmod.load_checkpoint_file(path)


class SimCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='nnguard-sim-')
        with open(os.devnull, 'w') as devnull:
            old = sys.stdout
            sys.stdout = devnull
            try:
                mktree.main([self.tmp, '--cases', '20'])
            finally:
                sys.stdout = old
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith('NNGUARD_SIM_') and not k.startswith('nnUNet')
                    and k != 'PYTORCH_CUDA_ALLOC_CONF'}
        self.env.update({
            'nnUNet_raw': os.path.join(self.tmp, 'nnUNet_raw'),
            'nnUNet_preprocessed': os.path.join(self.tmp, 'nnUNet_preprocessed'),
            'nnUNet_results': os.path.join(self.tmp, 'nnUNet_results'),
            'NNGUARD_SIM_EPOCHS': '6', 'NNGUARD_SIM_SAVE_EVERY': '2', 'NNGUARD_SIM_EPOCH_SECONDS': '0.02',
            'NNGUARD_SIM_VAL_CASE_SECONDS': '0.0', 'NNGUARD_SIM_VAL_CASES': '3', 'nnUNet_n_proc_DA': '1',
            'NNGUARD_SIM_MAX_POOL': '1', 'PYTHONUNBUFFERED': '1',
        })
        self.procs = []
        self.fold_dir = os.path.join(self.tmp, 'nnUNet_results', 'Dataset004_Hippocampus',
                                     'nnUNetTrainer__nnUNetPlans__3d_fullres', 'fold_0')

    def tearDown(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_sim(self, *args, env=None, timeout=30):
        e = dict(self.env)
        e.update(env or {})
        p = subprocess.Popen([sys.executable, SIM] + list(args), env=e, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(p)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err

    def start_sim(self, *args, env=None):
        e = dict(self.env)
        e.update(env or {})
        outf = open(os.path.join(self.tmp, 'out-%d.txt' % len(self.procs)), 'w+')
        self.addCleanup(outf.close)
        p = subprocess.Popen([sys.executable, SIM] + list(args), env=e, stdout=outf, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        p.outfile = outf.name
        self.procs.append(p)
        return p

    def wait_for_text(self, p, text, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(p.outfile) as f:
                if text in f.read():
                    return
            if p.poll() is not None:
                break
            time.sleep(0.05)
        with open(p.outfile) as f:
            self.fail('did not see %r; output:\n%s' % (text, f.read()[-3000:]))

    def last_line(self, text):
        return [l for l in text.rstrip('\n').split('\n')][-1]


class TestFormats(SimCase):
    def test_console_shapes_match_real_clean_log(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '-device', 'cpu')
        self.assertEqual(rc, 0, err)
        with open(os.path.join(CORPUS, 'a0_fresh_first_train.log')) as f:
            real_fresh = f.read()
        with open(os.path.join(CORPUS, 'a_clean.log')) as f:
            real = f.read()
        real_fresh = '\n'.join(l for l in real_fresh.split('\n') if not l.startswith('wall='))
        s_start, s_epochs, s_tail = collapse(kinds(out))
        r_start, r_epochs, r_tail = collapse(kinds(real_fresh))
        self.assertEqual(s_start, r_start)
        self.assertEqual(s_epochs, r_epochs)
        self.assertEqual(s_tail, r_tail)
        # second run in the same tree: "Using splits from existing split file" like a_clean.log
        rc, out2, err = self.run_sim('4', '3d_fullres', '0', '-device', 'cpu')
        self.assertEqual(rc, 0, err)
        self.assertEqual(collapse(kinds(out2)), collapse(kinds(real)))
        # exact texts of the header
        for line in ('Using device: cpu', 'Please cite the following paper when using nnU-Net:',
                     'This is the configuration used by this training:', 'Configuration name: 3d_fullres',
                     'These are the global plan.json settings:',
                     'perform_everything_on_device=True is only supported for cuda devices! Setting this to False'):
            self.assertIn(line, out.split('\n'))
        self.assertEqual(out.split('\n')[:4], real.split('\n')[:4])
        # per epoch: 6 epochs, 0-based, learning rate like the real log (same num_epochs=6)
        self.assertEqual(re.findall(r'Epoch (\d+)\n', out), ['0', '1', '2', '3', '4', '5'])
        self.assertEqual(re.findall(r'Current learning rate: (\S+)', out),
                         re.findall(r'Current learning rate: (\S+)', real))
        # log file: only print_to_log_file lines, trailing space
        logs = [f for f in os.listdir(self.fold_dir) if f.startswith('training_log_')]
        self.assertTrue(all(re.match(r'^training_log_\d{4}_\d{1,2}_\d{1,2}_\d\d_\d\d_\d\d\.txt$', f) for f in logs))
        with open(os.path.join(self.fold_dir, sorted(logs)[0])) as f:
            log = f.read()
        self.assertIn('Epoch 5 \n', log)
        self.assertRegex(log, TS + r' \n')
        self.assertNotIn('Using device', log)
        self.assertIn('Mean Validation Dice:  ', log)

    def test_folder_layout_matches_real_tree(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0')
        self.assertEqual(rc, 0, err)
        with open(os.path.join(CORPUS, 'a_clean.tree')) as f:
            tree = f.read()
        base_real, fold_real = set(), set()
        section = None
        for line in tree.split('\n'):
            if line.endswith('__2d/'):
                section = base_real
            elif line.endswith('fold_0/'):
                section = fold_real
            elif line.startswith('    ') and section is not None:
                name = line.split()[0]
                section.add('training_log.txt' if name.startswith('training_log_') else name)
        base = os.path.dirname(self.fold_dir)
        self.assertEqual({f for f in os.listdir(base) if f != 'fold_0'}, base_real)
        sim_fold = {('training_log.txt' if f.startswith('training_log_') else f)
                    for f in os.listdir(self.fold_dir) if f != 'validation'}
        self.assertEqual(sim_fold, fold_real)
        self.assertTrue(os.path.isfile(os.path.join(self.fold_dir, 'validation', 'summary.json')))
        with open(os.path.join(self.fold_dir, 'validation', 'summary.json')) as f:
            self.assertIn('Dice', json.load(f)['foreground_mean'])
        self.assertEqual(read_ckpt(os.path.join(self.fold_dir, 'checkpoint_final.pth'))['current_epoch'], 6)
        self.assertTrue(os.path.isfile(os.path.join(self.tmp, 'nnUNet_preprocessed', 'Dataset004_Hippocampus',
                                                    'splits_final.json')))
        with open(os.path.join(self.fold_dir, 'progress.png'), 'rb') as f:
            self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
        # the default device is cuda: nnU-Net prints cuda:0 and the pin_memory lines
        self.assertIn('Using device: cuda:0', out)
        self.assertIn('using pin_memory on device 0', out)

    def test_checkpoint_format_like_torch(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_VAL_CASES': '0'})
        self.assertEqual(rc, 0, err)
        path = os.path.join(self.fold_dir, 'checkpoint_final.pth')
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            self.assertEqual(names[0], 'checkpoint_final/data.pkl')
            self.assertIn('checkpoint_final/data/0', names)
            self.assertEqual(z.read('checkpoint_final/version'), b'3\n')
            self.assertTrue(all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist()))
            import pickle
            with self.assertRaises((pickle.UnpicklingError, ModuleNotFoundError)):  # like real torch files
                pickle.loads(z.read('checkpoint_final/data.pkl'))
        ck = read_ckpt(path)
        self.assertEqual(set(ck), {'network_weights', 'optimizer_state', 'grad_scaler_state', 'logging', '_best_ema',
                                   'current_epoch', 'init_args', 'trainer_name', 'inference_allowed_mirroring_axes'})
        self.assertEqual(ck['trainer_name'], 'nnUNetTrainer')
        self.assertEqual(ck['init_args']['device'], 'cuda')
        self.assertEqual(ck['init_args']['configuration'], '3d_fullres')
        self.assertEqual(len(ck['logging']['ema_fg_dice']), 6)
        self.assertIsInstance(ck['_best_ema'], float)

    def test_reads_real_fixture_checkpoints(self):
        ck = read_ckpt(os.path.join(FIXTURES, 'checkpoint_best.pth'))
        self.assertEqual(ck['current_epoch'], 6)
        self.assertEqual(ck['trainer_name'], 'nnUNetTrainer_tiny_fakeOOM')
        self.assertEqual(read_ckpt(os.path.join(FIXTURES, 'checkpoint_latest.pth'))['current_epoch'], 4)
        with self.assertRaises(simmod.CorruptCheckpoint) as cm:
            read_ckpt(os.path.join(FIXTURES, 'checkpoint_latest_truncated.pth'))
        self.assertEqual(str(cm.exception),
                         'PytorchStreamReader failed reading zip archive: failed finding central directory')

    def test_mktree_plans(self):
        with open(os.path.join(self.tmp, 'nnUNet_preprocessed', 'Dataset004_Hippocampus', 'nnUNetPlans.json')) as f:
            plans = json.load(f)
        self.assertEqual(plans['plans_name'], 'nnUNetPlans')
        self.assertEqual(set(plans['configurations']), {'2d', '3d_lowres', '3d_fullres', '3d_cascade_fullres'})
        self.assertEqual(plans['configurations']['3d_lowres']['next_stage'], '3d_cascade_fullres')
        casc = simmod.resolve_configuration(plans, '3d_cascade_fullres')
        self.assertEqual(casc['batch_size'], 12)
        self.assertEqual(casc['previous_stage'], '3d_lowres')
        for key in ('data_identifier', 'preprocessor_name', 'patch_size', 'median_image_size_in_voxels', 'spacing',
                    'normalization_schemes', 'use_mask_for_norm', 'resampling_fn_data', 'architecture', 'batch_dice'):
            self.assertIn(key, plans['configurations']['3d_fullres'])
        plans['configurations']['a'] = {'inherits_from': 'b'}
        plans['configurations']['b'] = {'inherits_from': 'a'}
        with self.assertRaisesRegex(RuntimeError, 'Circular dependency detected'):
            simmod.resolve_configuration(plans, 'a')


class TestCheckpointsAndResume(SimCase):
    def test_schedule_and_continue_order(self):
        # stall at epoch 3: latest (after epoch 1, current_epoch 2) and best exist, like c_fake_oom.tree
        p = self.start_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_STALL_AT_EPOCH': '3'})
        self.wait_for_text(p, 'Epoch 3\n')
        latest = os.path.join(self.fold_dir, 'checkpoint_latest.pth')
        best = os.path.join(self.fold_dir, 'checkpoint_best.pth')
        self.assertEqual(read_ckpt(latest)['current_epoch'], 2)
        self.assertEqual(read_ckpt(best)['current_epoch'], 3)
        self.assertFalse(os.path.exists(os.path.join(self.fold_dir, 'checkpoint_final.pth')))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=5)
        # --c prefers latest
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env={'NNGUARD_SIM_VAL_CASES': '1'})
        self.assertEqual(rc, 0, err)
        self.assertEqual(re.findall(r'Epoch (\d+)\n', out), ['2', '3', '4', '5'])
        self.assertFalse(os.path.exists(latest))
        # --c with final: no epochs, validation again
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env={'NNGUARD_SIM_VAL_CASES': '1'})
        self.assertEqual(rc, 0, err)
        self.assertEqual(re.findall(r'Epoch (\d+)\n', out), [])
        self.assertRegex(out, TS + r'Training done\.\n')
        self.assertIn('Mean Validation Dice:  ', out)
        # no final, no latest: best (current_epoch 6 here since the resumed run improved until the end)
        os.remove(os.path.join(self.fold_dir, 'checkpoint_final.pth'))
        shutil.copy(os.path.join(FIXTURES, 'checkpoint_latest.pth'), best)  # current_epoch 4
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env={'NNGUARD_SIM_VAL_CASES': '1'})
        self.assertEqual(rc, 0, err)
        self.assertEqual(re.findall(r'Epoch (\d+)\n', out), ['4', '5'])
        # nothing: WARNING and a new training
        for f in os.listdir(self.fold_dir):
            if f.endswith('.pth'):
                os.remove(os.path.join(self.fold_dir, f))
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env={'NNGUARD_SIM_VAL_CASES': '1'})
        self.assertEqual(rc, 0, err)
        self.assertIn('WARNING: Cannot continue training because there seems to be no checkpoint available to '
                      'continue from. Starting a new training...\n', out)
        self.assertEqual(re.findall(r'Epoch (\d+)\n', out)[0], '0')
        self.assertEqual(len([f for f in os.listdir(self.fold_dir) if f.startswith('training_log_')]) >= 1, True)

    def test_v20_continue_without_checkpoint_crashes(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env={'NNGUARD_SIM_VERSION': '2.0'})
        self.assertEqual(rc, 1)
        self.assertIn('WARNING: Cannot continue training', out)
        self.assertRegex(self.last_line(err), r"^FileNotFoundError: \[Errno 2\] No such file or directory: "
                                              r"'.*checkpoint_best\.pth'$")

    def test_truncated_checkpoint(self):
        p = self.start_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_TRUNCATE_CHECKPOINT_AT_EPOCH': '2',
                                                        'nnUNet_n_proc_DA': '2'})
        self.assertEqual(p.wait(timeout=20), -signal.SIGKILL)
        latest = os.path.join(self.fold_dir, 'checkpoint_latest.pth')
        self.assertFalse(zipfile.is_zipfile(latest))
        # the DA workers were orphaned by the SIGKILL of the main process (no prctl)
        orphans = [d for d in os.listdir('/proc') if d.isdigit() and alive(int(d)) and
                   os.getpgid(int(d)) == p.pid] if True else []
        self.assertEqual(len(orphans), 3)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c')
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err),
                         'RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central '
                         'directory')

    def test_disable_checkpointing_and_val(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--disable_checkpointing')
        self.assertEqual(rc, 0, err)
        self.assertIn('No checkpoint written, checkpointing is disabled', out)
        self.assertFalse([f for f in os.listdir(self.fold_dir) if f.endswith('.pth')])
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--val')
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err),
                         'RuntimeError: Cannot run validation because the training is not finished yet!')
        rc, out, err = self.run_sim('4', '3d_fullres', '0')
        self.assertEqual(rc, 0, err)
        os.remove(os.path.join(os.path.dirname(self.fold_dir), 'plans.json'))
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--val')
        self.assertEqual(rc, 0, err)
        self.assertNotIn('Epoch 0', out)
        self.assertIn('Mean Validation Dice:  ', out)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.fold_dir), 'plans.json')))


class TestFailures(SimCase):
    def test_gpu_oom_then_resume_with_smaller_batch(self):
        env = {'NNGUARD_SIM_SAMPLE_MIB': '3000', 'NNGUARD_SIM_OOM_FROM_EPOCH': '3'}
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env=env)
        self.assertEqual(rc, 1)
        last = self.last_line(err)
        self.assertRegex(last, r'^torch\.OutOfMemoryError: CUDA out of memory\. Tried to allocate [0-9.]+ GiB\. '
                               r'GPU 0 has a total capacity of 24\.00 GiB of which [0-9.]+ [MG]iB is free\. '
                               r'Including non-PyTorch memory, this process has [0-9.]+ GiB memory in use\. Of the '
                               r'allocated memory [0-9.]+ GiB is allocated by PyTorch, and [0-9.]+ [MG]iB is reserved '
                               r'by PyTorch but unallocated\. If reserved but unallocated memory is large try setting '
                               r'PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation\.  See '
                               r'documentation for Memory Management  \(https://pytorch\.org/docs/stable/notes/'
                               r'cuda\.html#environment-variables\)$')
        self.assertIn('in train_step\n    output = self.network(data)', err)
        self.assertTrue(out.rstrip().endswith('Current learning rate: 0.00536'))
        # derived plans file with the same internal plans_name and batch size 2
        pre = os.path.join(self.tmp, 'nnUNet_preprocessed', 'Dataset004_Hippocampus')
        with open(os.path.join(pre, 'nnUNetPlans.json')) as f:
            plans = json.load(f)
        plans['configurations']['3d_fullres']['batch_size'] = 2
        with open(os.path.join(pre, 'nnUNetPlans_bs2.json'), 'w') as f:
            json.dump(plans, f)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '-p', 'nnUNetPlans_bs2', '--c', env=env)
        self.assertEqual(rc, 0, err)
        self.assertNotIn('INFO: You are using the old nnU-Net default plans', out)
        self.assertIn("'batch_size': 2,", out)
        self.assertEqual(re.findall(r'Epoch (\d+)\n', out), ['2', '3', '4', '5'])
        self.assertEqual(os.listdir(os.path.join(self.tmp, 'nnUNet_results', 'Dataset004_Hippocampus')),
                         ['nnUNetTrainer__nnUNetPlans__3d_fullres'])
        with open(os.path.join(os.path.dirname(self.fold_dir), 'plans.json')) as f:
            self.assertEqual(json.load(f)['configurations']['3d_fullres']['batch_size'], 2)
        ck = read_ckpt(os.path.join(self.fold_dir, 'checkpoint_final.pth'))
        self.assertEqual(ck['init_args']['plans']['configurations']['3d_fullres']['batch_size'], 12)

    def test_fragmentation_and_expandable_segments(self):
        env = {'NNGUARD_SIM_FRAGMENTED': '1', 'NNGUARD_SIM_EPOCHS': '2', 'NNGUARD_SIM_VAL_CASES': '0',
               'NNGUARD_SIM_SAMPLE_MIB': '1500'}
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env=env)
        self.assertEqual(rc, 1)
        m = re.search(r'and ([0-9.]+) GiB is reserved by PyTorch but unallocated', err)
        self.assertTrue(m, err)
        self.assertGreater(float(m.group(1)), 0.3 * 24)
        env['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env=env)
        self.assertEqual(rc, 0, err)

    def test_gpu_state_file_foreign_process_and_xid(self):
        state = os.path.join(self.tmp, 'gpu.json')
        env = {'NNGUARD_SIM_GPU_STATE': state, 'NNGUARD_SIM_FOREIGN_MIB': '20000',
               'NNGUARD_SIM_FOREIGN_SECONDS': '600', 'NNGUARD_SIM_EPOCHS': '2', 'NNGUARD_SIM_VAL_CASES': '0'}
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env=env)
        self.assertEqual(rc, 1)
        self.assertIn('Process 999999 has 19.53 GiB memory in use.', err)
        with open(state) as f:
            st = json.load(f)
        self.assertEqual(st['total_mib'], 24576)
        foreign = [p for p in st['processes'] if p['pid'] == 999999]
        self.assertEqual(foreign[0]['name'], 'foreign_job')
        until = foreign[0]['until']
        # the expiry is kept across restarts
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env=env)
        with open(state) as f:
            self.assertEqual(json.load(f)['foreign']['until'], until)
        # once expired, the batch fits
        st['foreign']['until'] = time.time() - 1
        with open(state, 'w') as f:
            json.dump(st, f)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env=env)
        self.assertEqual(rc, 0, err)
        # Xid
        env2 = {'NNGUARD_SIM_GPU_STATE': state, 'NNGUARD_SIM_XID_AT_EPOCH': '1'}
        rc, out, err = self.run_sim('4', '3d_fullres', '1', env=env2)
        self.assertEqual(rc, 1)
        self.assertIn('RuntimeError: CUDA error: unknown error\n', err)
        with open(state) as f:
            self.assertEqual(json.load(f)['xids'][0]['xid'], 79)

    def test_host_oom_kills_a_real_worker(self):
        env = {'NNGUARD_SIM_HOST_MIB': '1500', 'nnUNet_n_proc_DA': '2', 'NNGUARD_SIM_HOST_OOM_FROM_EPOCH': '2',
               'NNGUARD_SIM_HANG_AFTER_FATAL': '1'}
        p = self.start_sim('4', '3d_fullres', '0', env=env)
        self.wait_for_text(p, 'Epoch 0\n')
        before = sorted(children_of(p.pid))
        self.assertEqual(len(before), 3)
        self.wait_for_text(p, 'in __get_next_item\n    raise RuntimeError')
        self.wait_for_text(p, 'RuntimeError: ' + simmod.DEAD_WORKERS_MSG + '\n', timeout=5)
        after = sorted(children_of(p.pid))
        self.assertEqual(len(after), 2)  # one child got SIGKILLed, the others are alive (hang after fatal)
        self.assertTrue(set(after) < set(before))
        with open(p.outfile) as f:
            text = f.read()
        i_thread = text.index('Exception in thread Thread-1 (results_loop):')
        i_main = text.index('Traceback (most recent call last):\n  File "/opt/venv/bin/nnUNetv2_train"')
        self.assertLess(i_thread, i_main)
        self.assertIn('Epoch 2\n', text)
        self.assertNotIn('Exception in background worker', text)
        os.killpg(p.pid, signal.SIGKILL)
        # without the hang knob: exit 1
        env.pop('NNGUARD_SIM_HANG_AFTER_FATAL')
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env=env)
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err), 'RuntimeError: ' + simmod.DEAD_WORKERS_MSG)

    def test_worker_killed_from_outside_is_noticed(self):
        # what the kernel's OOM killer does: a worker dies without a word
        env = {'nnUNet_n_proc_DA': '2', 'NNGUARD_SIM_EPOCHS': '1000', 'NNGUARD_SIM_EPOCH_SECONDS': '0.2'}
        p = self.start_sim('4', '3d_fullres', '0', env=env)
        self.wait_for_text(p, 'Epoch 1\n')
        kids = children_of(p.pid)
        self.assertEqual(len(kids), 3)
        os.kill(kids[0], signal.SIGKILL)
        self.assertEqual(p.wait(timeout=15), 1)
        with open(p.outfile) as f:
            text = f.read()
        self.assertIn('Exception in thread Thread-1 (results_loop):', text)
        self.assertEqual(self.last_line(text), 'RuntimeError: ' + simmod.DEAD_WORKERS_MSG)
        self.assertNotIn('Exception in background worker', text)

    def test_real_worker_memory(self):
        env = {'nnUNet_n_proc_DA': '1', 'NNGUARD_SIM_REAL_WORKER_MIB': '64', 'NNGUARD_SIM_STALL_AT_EPOCH': '1'}
        p = self.start_sim('4', '3d_fullres', '0', env=env)
        self.wait_for_text(p, 'Epoch 1\n')
        for k in children_of(p.pid):
            with open('/proc/%d/status' % k) as f:
                rss_kb = int([l for l in f if l.startswith('VmRSS:')][0].split()[1])
            self.assertGreater(rss_kb, 60 * 1024)

    def test_worker_exception(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_WORKER_EXCEPTION_AT_EPOCH': '0'})
        self.assertEqual(rc, 1)
        self.assertIn('Exception in background worker 0:\n mmap length is greater than file size\n', out)
        self.assertIn('ValueError: mmap length is greater than file size', err)
        self.assertIn('in get_dataloaders\n    _ = next(mt_gen_train)', err)
        self.assertNotIn('This is the configuration used by this training', out)
        self.assertEqual(self.last_line(err), 'RuntimeError: ' + simmod.DEAD_WORKERS_MSG)
        rc, out, err = self.run_sim('4', '3d_fullres', '1', env={'NNGUARD_SIM_WORKER_EXCEPTION_AT_EPOCH': '2',
                                                                 'NNGUARD_SIM_WORKER_EXCEPTION_KIND': 'io'})
        self.assertEqual(rc, 1)
        self.assertRegex(err, r"OSError: \[Errno 5\] Input/output error: '.*nnUNet_preprocessed/Dataset004_"
                              r"Hippocampus/nnUNetPlans_3d_fullres/\w+\.pkl'")
        self.assertIn('Epoch 2\n', out)

    def test_worker_counts(self):
        for n, expected in (('3', 3 + 1), ('1', 2), ('0', 0)):
            p = self.start_sim('4', '3d_fullres', '0', env={'nnUNet_n_proc_DA': n,
                                                            'NNGUARD_SIM_STALL_AT_EPOCH': '1'})
            self.wait_for_text(p, 'Epoch 1\n')
            kids = children_of(p.pid)
            self.assertEqual(len(kids), expected, 'nnUNet_n_proc_DA=%s' % n)
            with open('/proc/%d/cmdline' % p.pid, 'rb') as f:
                main_cmd = f.read()
            for k in kids:  # forked: same command line as main
                with open('/proc/%d/cmdline' % k, 'rb') as f:
                    self.assertEqual(f.read(), main_cmd)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)

    def test_fail_classes(self):
        cases = [
            ('cuda_assert', {}, 'RuntimeError: CUDA error: device-side assert triggered\n',
             'Assertion `t >= 0 && t < n_classes` failed.'),
            ('cuda_illegal', {}, 'RuntimeError: CUDA error: an illegal memory access was encountered\n', None),
            ('compile_error', {}, "returned non-zero exit status 1.", "torch._dynamo.exc.BackendCompilerFailed"),
            ('disk_full', {'NNGUARD_SIM_FAIL_EPOCH': '1'}, 'OSError: [Errno 28] No space left on device', None),
            ('shm_exhausted', {'nnUNet_n_proc_DA': '3'},
             'No space left on device (28)', 'RuntimeError: ' + simmod.DEAD_WORKERS_MSG),
        ]
        for fold, (cls, env, text, text2) in enumerate(cases):
            e = {'NNGUARD_SIM_FAIL': cls}
            e.update(env)
            rc, out, err = self.run_sim('4', '3d_fullres', str(fold), env=e)
            self.assertEqual(rc, 1, cls)
            self.assertIn(text, err, cls)
            if text2:
                self.assertIn(text2, err, cls)
        # shutdown noise after a main-process exception (like c_fake_oom.log)
        rc, out, err = self.run_sim('4', '3d_fullres', '4', env={'NNGUARD_SIM_FAIL': 'cuda_illegal',
                                                                 'NNGUARD_SIM_SHUTDOWN_NOISE': '1'})
        self.assertEqual(rc, 1)
        self.assertLess(err.index('an illegal memory access'), err.index('Exception in thread Thread-1 (results_loop)'))
        # the settings-driven ones go away with the documented fix
        for cls, fix in (('compile_error', {'nnUNet_compile': 'f'}), ('shm_exhausted', {'nnUNet_n_proc_DA': '2'}),
                         ('validation_export', {'nnUNet_def_n_proc': '2'})):
            e = {'NNGUARD_SIM_FAIL': cls, 'NNGUARD_SIM_EPOCHS': '2'}
            e.update(fix)
            rc, out, err = self.run_sim('4', '3d_fullres', '0', env=e)
            self.assertEqual(rc, 0, cls + err)

    def test_validation_export_and_val_retry(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_FAIL': 'validation_export'})
        self.assertEqual(rc, 1)
        self.assertIn('Training done.', out)
        self.assertIn('check_workers_alive_and_busy', err)
        self.assertEqual(self.last_line(err), 'RuntimeError: Some background workers are no longer alive')
        self.assertFalse(os.path.exists(os.path.join(self.fold_dir, 'validation', 'summary.json')))
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--val', env={'NNGUARD_SIM_FAIL': 'validation_export',
                                                                          'nnUNet_def_n_proc': '1'})
        self.assertEqual(rc, 0, err)
        self.assertTrue(os.path.exists(os.path.join(self.fold_dir, 'validation', 'summary.json')))

    def test_nan_loss_keeps_training(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_FAIL': 'nan_loss',
                                                                 'NNGUARD_SIM_FAIL_EPOCH': '2'})
        self.assertEqual(rc, 0, err)
        self.assertRegex(out, TS + r'train_loss nan\n' + TS + r'val_loss nan\n' + TS + r'Pseudo dice \[0\.0, 0\.0\]')
        self.assertEqual(len(re.findall('train_loss nan', out)), 4)

    def test_config_weights_only(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env={'NNGUARD_SIM_EPOCHS': '2'})
        self.assertEqual(rc, 0)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env={'NNGUARD_SIM_FAIL': 'config_weights_only',
                                                                        'NNGUARD_SIM_EPOCHS': '2'})
        self.assertEqual(rc, 1)
        self.assertIn('_pickle.UnpicklingError: Weights only load failed.', err)
        self.assertIn('Unsupported global: GLOBAL numpy.core.multiarray.scalar', err)

    def test_crash_once_file_and_stall(self):
        once = os.path.join(self.tmp, 'once.json')
        env = {'NNGUARD_SIM_CRASH_AT_EPOCH': '1', 'NNGUARD_SIM_ONCE_FILE': once}
        rc, out, err = self.run_sim('4', '3d_fullres', '0', env=env)
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err), 'IndexError: list index out of range')
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', env=env)
        self.assertEqual(rc, 0, err)
        with open(once) as f:
            self.assertEqual(json.load(f), ['crash'])
        # without the once file the crash repeats
        rc, out, err = self.run_sim('4', '3d_fullres', '1', env={'NNGUARD_SIM_CRASH_AT_EPOCH': '1'})
        self.assertEqual(rc, 1)
        rc, out, err = self.run_sim('4', '3d_fullres', '1', '--c', env={'NNGUARD_SIM_CRASH_AT_EPOCH': '1'})
        self.assertEqual(rc, 1)
        # validation stall: silent, no CPU, stays alive
        p = self.start_sim('4', '3d_fullres', '2', env={'NNGUARD_SIM_STALL_IN_VALIDATION': '1'})
        self.wait_for_text(p, 'predicting ')
        self.wait_for_text(p, 'rank 0\n' + '.' * 0)
        deadline = time.time() + 10
        while time.time() < deadline:
            with open(p.outfile) as f:
                if f.read().count(', shape torch.Size') >= 2:
                    break
            time.sleep(0.05)
        self.assertIsNone(p.poll())
        with open('/proc/%d/stat' % p.pid) as f:
            self.assertIn(f.read().split(') ')[1][0], 'S')


class TestCli(SimCase):
    def test_argparse_exit_2(self):
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--use_compressed')
        self.assertEqual(rc, 2)
        self.assertIn('unrecognized arguments: --use_compressed', err)
        rc, out, err = self.run_sim('4')
        self.assertEqual(rc, 2)

    def test_config_errors(self):
        rc, out, err = self.run_sim('99', '3d_fullres', '0')
        self.assertEqual(rc, 1)
        self.assertIn('RuntimeError: Could not find a dataset with the ID 99. Make sure the requested dataset ID '
                      'exists', err)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '-p', 'Nope')
        self.assertEqual(rc, 1)
        self.assertRegex(self.last_line(err), r"^FileNotFoundError: \[Errno 2\] No such file or directory: "
                                              r"'.*Dataset004_Hippocampus/Nope\.json'$")
        rc, out, err = self.run_sim('4', '3d_foo', '0')
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err), "RuntimeError: Requested configuration 3d_foo not found in plans. "
                                              "Available configurations: ['2d', '3d_lowres', '3d_fullres', "
                                              "'3d_cascade_fullres']")
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '-tr', 'MyTrainer')
        self.assertEqual(rc, 1)
        self.assertIn('RuntimeError: Could not find requested nnunet trainer MyTrainer in '
                      'nnunetv2.training.nnUNetTrainer (', err)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '-tr', 'MyTrainer',
                                    env={'NNGUARD_SIM_TRAINERS': 'Other,MyTrainer', 'NNGUARD_SIM_EPOCHS': '1'})
        self.assertEqual(rc, 0, err)
        rc, out, err = self.run_sim('4', '3d_fullres', 'x')
        self.assertEqual(rc, 1)
        self.assertIn('Unable to convert given value for fold to int: x.', out)
        self.assertEqual(self.last_line(err), "ValueError: invalid literal for int() with base 10: 'x'")
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', '--val')
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err), 'AssertionError: Cannot set --c and --val flag at the same time. Dummy.')
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--c', '-pretrained_weights', 'x.pth')
        self.assertEqual(rc, 1)
        self.assertIn('RuntimeError: Cannot both continue a training AND load pretrained weights.', err)
        rc, out, err = self.run_sim('4', '3d_fullres', '0', '--val_best', '--disable_checkpointing')
        self.assertEqual(rc, 1)
        self.assertEqual(self.last_line(err),
                         'AssertionError: --val_best is not compatible with --disable_checkpointing')
        for var in ('nnUNet_preprocessed', 'nnUNet_raw', 'nnUNet_results'):
            e = dict(self.env)
            del e[var]
            p = subprocess.run([sys.executable, SIM, '4', '3d_fullres', '0'], env=e, capture_output=True, text=True,
                               timeout=20, start_new_session=True)
            self.assertEqual(p.returncode, 1)
            self.assertTrue(self.last_line(p.stderr).startswith('RuntimeError: %s is not defined' % var), p.stderr)

    def test_results_folder_uses_internal_plans_name(self):
        pre = os.path.join(self.tmp, 'nnUNet_preprocessed', 'Dataset004_Hippocampus')
        shutil.copy(os.path.join(pre, 'nnUNetPlans.json'), os.path.join(pre, 'Other.json'))
        rc, out, err = self.run_sim('Dataset004_Hippocampus', '3d_cascade_fullres', 'all', '-p', 'Other',
                                    '-tr', 'nnUNetTrainer_5epochs', env={'NNGUARD_SIM_EPOCHS': '1'})
        self.assertEqual(rc, 0, err)
        self.assertNotIn('INFO: You are using the old nnU-Net default plans', out)
        self.assertTrue(out.startswith('Using device: cuda:0\n\n####'))
        self.assertTrue(os.path.isdir(os.path.join(self.tmp, 'nnUNet_results', 'Dataset004_Hippocampus',
                                                   'nnUNetTrainer_5epochs__nnUNetPlans__3d_cascade_fullres',
                                                   'fold_all')))
        self.assertIn("'previous_stage': '3d_lowres'", out)
        self.assertIn("'batch_size': 12,", out)


if __name__ == '__main__':
    unittest.main()
