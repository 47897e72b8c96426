package nnunet

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEnvFrom(t *testing.T) {
	root := t.TempDir()
	pre, res := filepath.Join(root, "pre"), filepath.Join(root, "res")
	os.Mkdir(pre, 0o755)
	os.Mkdir(res, 0o755)
	file := filepath.Join(root, "file")
	os.WriteFile(file, nil, 0o644)
	getenv := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

	env, err := EnvFrom(getenv(map[string]string{"nnUNet_preprocessed": pre, "nnUNet_results": res}))
	if err != nil || env.Preprocessed != pre || env.Results != res || env.Raw != "" {
		t.Fatalf("env %+v err %v", env, err)
	}
	// nnU-Net creates a missing results folder whose parent exists
	if _, err := EnvFrom(getenv(map[string]string{"nnUNet_preprocessed": pre, "nnUNet_results": filepath.Join(root, "new")})); err != nil {
		t.Fatalf("a new results folder under an existing parent: %v", err)
	}
	for _, tc := range []struct {
		vars map[string]string
		want string
	}{
		{map[string]string{"nnUNet_results": res}, "nnUNet_preprocessed is not set: export nnUNet_preprocessed="},
		{map[string]string{"nnUNet_preprocessed": pre}, "nnUNet_results is not set: export nnUNet_results="},
		{map[string]string{"nnUNet_preprocessed": pre, "nnUNet_results": filepath.Join(root, "nope", "results")}, "does not exist"},
		{map[string]string{"nnUNet_preprocessed": filepath.Join(root, "nope"), "nnUNet_results": res}, "does not exist"},
		{map[string]string{"nnUNet_preprocessed": file, "nnUNet_results": res}, "is not a folder"},
	} {
		_, err := EnvFrom(getenv(tc.vars))
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "nnunet: ") {
			t.Errorf("EnvFrom(%v) = %v; want ErrConfig containing %q", tc.vars, err, tc.want)
		}
	}
}

func TestFindDataset(t *testing.T) {
	pre := t.TempDir()
	for _, d := range []string{"Dataset004_Hippocampus", "Dataset027_ACDC", "Dataset027_Other", "Dataset1234_Big"} {
		os.Mkdir(filepath.Join(pre, d), 0o755)
	}
	os.WriteFile(filepath.Join(pre, "Dataset005_File"), nil, 0o644) // a file, not a dataset

	for in, want := range map[string]string{
		"4": "Dataset004_Hippocampus", "004": "Dataset004_Hippocampus", " +4 ": "Dataset004_Hippocampus",
		"Dataset004_Hippocampus": "Dataset004_Hippocampus", "1234": "Dataset1234_Big",
		"Dataset004_Hippocampus/": "Dataset004_Hippocampus", // tab completion
	} {
		got, err := FindDataset(pre, in)
		if err != nil || got != filepath.Join(pre, want) {
			t.Errorf("FindDataset(%q) = %q, %v; want %s", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"27":                   "more than one dataset with id 27",
		"5":                    "no dataset with id 5",
		"99":                   "found: Dataset004_Hippocampus, Dataset027_ACDC, Dataset027_Other, Dataset1234_Big",
		"Dataset099_Nope":      "Dataset099_Nope not found",
		"Hippocampus":          "must either be an integer or a valid dataset name",
		"DatasetX":             "not a valid dataset name",
		"Dataset004_../../etc": "not a valid dataset name",
		"4.0":                  "must either be an integer",
	} {
		_, err := FindDataset(pre, in)
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), want) {
			t.Errorf("FindDataset(%q) = %v; want ErrConfig containing %q", in, err, want)
		}
	}
}

func TestFolds(t *testing.T) {
	for in, want := range map[string]string{"0": "0", "4": "4", "all": "all", " 1 ": "1", "+01": "1", "1_0": "10"} {
		if got, err := CanonicalFold(in); err != nil || got != want {
			t.Errorf("CanonicalFold(%q) = %q, %v; want %q", in, got, err, want)
		}
		if err := ValidFold(in); err != nil {
			t.Errorf("ValidFold(%q) = %v", in, err)
		}
	}
	for _, in := range []string{"", "-1", "All", "x", "1.0", "_1", "1__0", "0x1"} {
		if err := ValidFold(in); !errors.Is(err, ErrConfig) {
			t.Errorf("ValidFold(%q) = %v; want ErrConfig", in, err)
		}
	}
}

func TestFoldDir(t *testing.T) {
	env := Env{Results: filepath.FromSlash("/data/nnUNet_results")}
	got := FoldDir(env, "Dataset999_Toy", "nnUNetTrainer_tiny_fakeOOM", "nnUNetPlans", "2d", "0")
	want := filepath.FromSlash("/data/nnUNet_results/Dataset999_Toy/nnUNetTrainer_tiny_fakeOOM__nnUNetPlans__2d/fold_0")
	if got != want {
		t.Fatalf("FoldDir = %s, want %s", got, want)
	}
	if got := FoldDir(env, "D", "T", "P", "c", "01"); filepath.Base(got) != "fold_1" {
		t.Fatalf("canonical fold: %s", got)
	}
	if got := FoldDir(env, "D", "T", "P", "c", "all"); filepath.Base(got) != "fold_all" {
		t.Fatalf("fold all: %s", got)
	}
}
