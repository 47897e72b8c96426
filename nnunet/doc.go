// Package nnunet knows nnU-Net v2's files: the environment variables, dataset
// folders, plans files (loading, resolving inherits_from, deriving a copy
// with a lower batch size that keeps the same results folder), the results
// folder layout, checkpoints (validity and epoch, read without torch) and the
// argument list of nnUNetv2_train.
//
// The user's files are read-only to this package: plans are derived into new
// files, checkpoints are moved aside or copied, never edited or deleted.
// Every file it writes is written atomically (internal/atomicfile).
//
// Every error caused by the user's input before a launch (unset environment
// variables, unknown dataset, malformed plans, unknown configuration, bad
// arguments) wraps ErrConfig, so that the command line maps it to exit 2.
package nnunet
