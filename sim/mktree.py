#!/usr/bin/env python3
"""Create a fake nnU-Net v2 data tree for the simulated trainer (sim/nnunetv2_train.py).

usage: mktree.py ROOT [--dataset-id 4] [--dataset-name Hippocampus] [--batch-size 12]
                      [--plans-name nnUNetPlans] [--cases 20]

Creates ROOT/nnUNet_raw/DatasetXXX_Name/dataset.json (+ empty imagesTr/labelsTr),
ROOT/nnUNet_preprocessed/DatasetXXX_Name/{<plans-name>.json, dataset.json, dataset_fingerprint.json,
gt_segmentations/, <plans-name>_3d_fullres/ (fake .b2nd/.pkl case files)} and ROOT/nnUNet_results.
splits_final.json is NOT created: like the real trainer, the simulator creates it on the first training.
Prints the three `export` lines for the environment variables.
"""

import argparse
import json
import os
import sys


def make_plans(dataset_name, plans_name, batch_size):
    def resampling():
        return {
            'resampling_fn_data': 'resample_data_or_seg_to_shape',
            'resampling_fn_seg': 'resample_data_or_seg_to_shape',
            'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
            'resampling_fn_seg_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
            'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
            'resampling_fn_probabilities_kwargs': {'is_seg': False, 'order': 1, 'order_z': 0,
                                                   'force_separate_z': None},
        }

    def arch(dim, n_stages, features, strides):
        conv = 'torch.nn.modules.conv.Conv%dd' % dim
        norm = 'torch.nn.modules.instancenorm.InstanceNorm%dd' % dim
        return {
            'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {
                'n_stages': n_stages,
                'features_per_stage': features,
                'conv_op': conv,
                'kernel_sizes': [[3] * dim for _ in range(n_stages)],
                'strides': strides,
                'n_conv_per_stage': [2] * n_stages,
                'n_conv_per_stage_decoder': [2] * (n_stages - 1),
                'conv_bias': True,
                'norm_op': norm,
                'norm_op_kwargs': {'eps': 1e-05, 'affine': True},
                'dropout_op': None,
                'dropout_op_kwargs': None,
                'nonlin': 'torch.nn.LeakyReLU',
                'nonlin_kwargs': {'inplace': True},
            },
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin'],
        }

    def cfg(identifier, bs, patch, median, spacing, architecture, extra=None):
        c = {'data_identifier': identifier, 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': bs,
             'patch_size': patch, 'median_image_size_in_voxels': median, 'spacing': spacing,
             'normalization_schemes': ['ZScoreNormalization'], 'use_mask_for_norm': [False]}
        c.update(resampling())
        c['architecture'] = architecture
        c['batch_dice'] = False
        if extra:
            c.update(extra)
        return c

    configurations = {
        '2d': cfg(plans_name + '_2d', max(2, batch_size * 10), [56, 40], [50.0, 35.0], [1.0, 1.0],
                  arch(2, 4, [32, 64, 128, 256], [[1, 1], [2, 2], [2, 2], [2, 2]]), {'batch_dice': True}),
        '3d_lowres': cfg(plans_name + '_3d_lowres', batch_size, [32, 48, 32], [27.0, 38.0, 27.0],
                         [1.3, 1.3, 1.3], arch(3, 4, [32, 64, 128, 256],
                                               [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
                         {'next_stage': '3d_cascade_fullres'}),
        '3d_fullres': cfg(plans_name + '_3d_fullres', batch_size, [40, 56, 40], [36.0, 50.0, 35.0],
                          [1.0, 1.0, 1.0], arch(3, 4, [32, 64, 128, 256],
                                                [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])),
        '3d_cascade_fullres': {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'},
    }
    return {
        'dataset_name': dataset_name,
        'plans_name': plans_name,
        'original_median_spacing_after_transp': [1.0, 1.0, 1.0],
        'original_median_shape_after_transp': [36, 50, 35],
        'image_reader_writer': 'SimpleITKIO',
        'transpose_forward': [0, 1, 2],
        'transpose_backward': [0, 1, 2],
        'configurations': configurations,
        'experiment_planner_used': 'ExperimentPlanner',
        'label_manager': 'LabelManager',
        'foreground_intensity_properties_per_channel': {'0': {
            'max': 486420.21875, 'mean': 22360.326171875, 'median': 362.88250732421875, 'min': 0.0,
            'percentile_00_5': 28.0, 'percentile_99_5': 277682.03125, 'std': 60656.1328125}},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description='Create a fake nnU-Net v2 tree for the simulated trainer.')
    ap.add_argument('root')
    ap.add_argument('--dataset-id', type=int, default=4)
    ap.add_argument('--dataset-name', default='Hippocampus')
    ap.add_argument('--batch-size', type=int, default=12)
    ap.add_argument('--plans-name', default='nnUNetPlans')
    ap.add_argument('--cases', type=int, default=20)
    a = ap.parse_args(argv)
    root = os.path.abspath(a.root)
    ds = 'Dataset%03d_%s' % (a.dataset_id, a.dataset_name)
    raw = os.path.join(root, 'nnUNet_raw')
    pre = os.path.join(root, 'nnUNet_preprocessed')
    res = os.path.join(root, 'nnUNet_results')
    low = a.dataset_name.lower()
    cases = ['%s_%03d' % (low, i + 1) for i in range(a.cases)]
    dataset_json = {
        'channel_names': {'0': 'MRI'},
        'labels': {'background': 0, 'Anterior': 1, 'Posterior': 2},
        'numTraining': a.cases,
        'file_ending': '.nii.gz',
        'name': a.dataset_name,
    }
    for d in (os.path.join(raw, ds, 'imagesTr'), os.path.join(raw, ds, 'labelsTr'), os.path.join(pre, ds), res):
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(raw, ds, 'dataset.json'), 'w') as f:
        json.dump(dataset_json, f, indent=4)
    with open(os.path.join(pre, ds, 'dataset.json'), 'w') as f:
        json.dump(dataset_json, f, indent=4)
    with open(os.path.join(pre, ds, a.plans_name + '.json'), 'w') as f:
        json.dump(make_plans(ds, a.plans_name, a.batch_size), f, indent=4)
    fingerprint = {
        'foreground_intensity_properties_per_channel': {'0': {'max': 486420.21875, 'mean': 22360.326171875,
                                                              'median': 362.88250732421875, 'min': 0.0,
                                                              'percentile_00_5': 28.0,
                                                              'percentile_99_5': 277682.03125,
                                                              'std': 60656.1328125}},
        'median_relative_size_after_cropping': 1.0,
        'shapes_after_crop': [[1, 36, 50, 35] for _ in cases],
        'spacings': [[1.0, 1.0, 1.0] for _ in cases],
    }
    with open(os.path.join(pre, ds, 'dataset_fingerprint.json'), 'w') as f:
        json.dump(fingerprint, f, indent=4)
    data_dir = os.path.join(pre, ds, a.plans_name + '_3d_fullres')
    gt_dir = os.path.join(pre, ds, 'gt_segmentations')
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    for c in cases:
        for suffix in ('.b2nd', '_seg.b2nd'):
            with open(os.path.join(data_dir, c + suffix), 'wb') as f:
                f.write(b'\x00' * 256)
        with open(os.path.join(data_dir, c + '.pkl'), 'wb') as f:
            f.write(b'\x80\x04}\x94.')
        with open(os.path.join(gt_dir, c + '.nii.gz'), 'wb') as f:
            f.write(b'\x1f\x8b')
    print('export nnUNet_raw="%s"' % raw)
    print('export nnUNet_preprocessed="%s"' % pre)
    print('export nnUNet_results="%s"' % res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
