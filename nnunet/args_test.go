package nnunet

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestParseTrainArgs(t *testing.T) {
	a, err := ParseTrainArgs(strings.Fields("999 2d 0 -tr nnUNetTrainer_tiny -device cpu -p=nnUNetPlans_x --npz -num_gpus 2 --val_best --use_compressed --weird -pretrained_weights /w.pth extra"))
	if err != nil {
		t.Fatal(err)
	}
	want := TrainArgs{
		Dataset: "999", Configuration: "2d", Fold: "0", Trainer: "nnUNetTrainer_tiny", Plans: "nnUNetPlans_x",
		PretrainedWeights: "/w.pth", NPZ: true, ValBest: true, UseCompressed: true, NumGPUs: 2, Device: "cpu",
		Rest: []string{"--weird", "extra"},
	}
	a.toks = nil
	if !reflect.DeepEqual(a, want) {
		t.Fatalf("got  %+v\nwant %+v", a, want)
	}
	// Defaults.
	a, err = ParseTrainArgs([]string{"Dataset004_Hippocampus", "3d_fullres", "all"})
	if err != nil {
		t.Fatal(err)
	}
	if a.Trainer != DefaultTrainer || a.Plans != DefaultPlans || a.NumGPUs != 1 || a.Device != "cuda" || a.Fold != "all" {
		t.Fatalf("defaults: %+v", a)
	}
	// Options before positionals, last one wins, "--".
	a, err = ParseTrainArgs([]string{"-tr", "A", "--c", "4", "-tr", "B", "3d_fullres", "--", "-1"})
	if err == nil {
		t.Fatal("negative fold accepted")
	}
	a, err = ParseTrainArgs([]string{"-tr", "A", "--c", "4", "-tr", "B", "3d_fullres", "--", "1"})
	if err != nil || a.Trainer != "B" || !a.Continue || a.Dataset != "4" || a.Fold != "1" {
		t.Fatalf("%+v %v", a, err)
	}
}

func TestParseTrainArgsErrors(t *testing.T) {
	for args, want := range map[string]string{
		"4 3d_fullres":                                      "needs three arguments",
		"4 3d_fullres x":                                    "fold",
		"4 3d_fullres 0 -tr":                                "-tr needs a value",
		"4 3d_fullres 0 -p --c":                             "-p needs a value",
		"4 3d_fullres 0 --c=1":                              "--c takes no value",
		"4 3d_fullres 0 --disable":                          "abbreviation of --disable_checkpointing",
		"4 3d_fullres 0 --va":                               "ambiguous",
		"4 3d_fullres 0 -dev cpu":                           "abbreviation of -device",
		"4 3d_fullres 0 -pMyPlans":                          "write -p <plans identifier>",
		"4 3d_fullres 0 -device gpu1":                       "use cpu, cuda or mps",
		"4 3d_fullres 0 -num_gpus two":                      "-num_gpus",
		"4 3d_fullres 0 --c --val":                          "--c and --val",
		"4 3d_fullres 0 --c -pretrained_weights w":          "-pretrained_weights",
		"4 3d_fullres 0 --val_best --disable_checkpointing": "--val_best and --disable_checkpointing",
	} {
		_, err := ParseTrainArgs(strings.Fields(args))
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseTrainArgs(%q) = %v; want ErrConfig containing %q", args, err, want)
		}
	}
}

func TestArgvRoundTrip(t *testing.T) {
	for _, line := range []string{
		"999 2d 0",
		"999 2d 0 -tr nnUNetTrainer_tiny -device cpu",
		"-tr=X 4 -p nnUNetPlans 3d_fullres --npz 1 -num_gpus 02 --weird",
		"4 3d_fullres 0 --val --npz -pretrained_weights w.pth",
		"4 3d_fullres 0 -- x",
		"4 3d_fullres 0 -num_gpus=+2",
	} {
		a, err := ParseTrainArgs(strings.Fields(line))
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		if got := strings.Join(a.Argv(ArgvOptions{}), " "); got != line {
			t.Errorf("round trip %q -> %q", line, got)
		}
	}
}

func TestArgvChanges(t *testing.T) {
	for _, tc := range []struct {
		line string
		o    ArgvOptions
		want string
	}{
		{"999 2d 0 -tr T -device cpu", ArgvOptions{Plans: "nnUNetPlans__nnguard_2d_f0_bs2", Continue: true},
			"999 2d 0 -tr T -device cpu -p nnUNetPlans__nnguard_2d_f0_bs2 --c"},
		{"999 2d 0 -p=Mine -tr T", ArgvOptions{Plans: "Mine__nnguard_2d_f0_bs2", Continue: true},
			"999 2d 0 -p=Mine__nnguard_2d_f0_bs2 -tr T --c"},
		{"999 2d 0 -p Mine --c -tr T", ArgvOptions{Plans: "D", Continue: true},
			"999 2d 0 -p D --c -tr T"},
		{"999 2d 0 -pretrained_weights w.pth -tr T --npz", ArgvOptions{Continue: true, DropPretrained: true},
			"999 2d 0 -tr T --npz --c"},
		{"999 2d 0 -tr T --c --npz", ArgvOptions{ValOnly: true},
			"999 2d 0 -tr T --npz --val"},
		{"999 2d 0 --val --npz", ArgvOptions{Continue: true},
			"999 2d 0 --val --npz"},
		{"999 2d 0 -tr A -tr B", ArgvOptions{}, "999 2d 0 -tr B"},
		// the user's --c goes when the caller says there is nothing to resume
		{"999 2d 0 --c -tr T", ArgvOptions{Continue: false}, "999 2d 0 -tr T"},
		{"999 2d 0 --weird -- x", ArgvOptions{Continue: true, Plans: "P"}, "999 2d 0 --weird -p P --c -- x"},
	} {
		a, err := ParseTrainArgs(strings.Fields(tc.line))
		if err != nil {
			t.Fatalf("%q: %v", tc.line, err)
		}
		if got := strings.Join(a.Argv(tc.o), " "); got != tc.want {
			t.Errorf("%q %+v:\n got %q\nwant %q", tc.line, tc.o, got, tc.want)
		}
		// Argv does not change a.
		b, _ := ParseTrainArgs(strings.Fields(tc.line))
		if !reflect.DeepEqual(a, b) {
			t.Errorf("Argv modified its receiver")
		}
	}
}

func TestArgvHandBuilt(t *testing.T) {
	a := TrainArgs{Dataset: "4", Configuration: "3d_fullres", Fold: "0", Trainer: "T", NumGPUs: 2, NPZ: true, Rest: []string{"--x"}}
	want := "4 3d_fullres 0 -tr T -num_gpus 2 --npz --c --x"
	if got := strings.Join(a.Argv(ArgvOptions{Continue: true}), " "); got != want {
		t.Fatalf("got %q want %q", got, want)
	}
	// Changing a parsed field is reflected in place.
	p, _ := ParseTrainArgs(strings.Fields("4 3d_fullres 0 -tr T -device cpu"))
	p.Trainer = "U"
	p.Fold = "1"
	if got := strings.Join(p.Argv(ArgvOptions{}), " "); got != "4 3d_fullres 1 -tr U -device cpu" {
		t.Fatalf("got %q", got)
	}
}

func FuzzParseTrainArgs(f *testing.F) {
	f.Add("999 2d 0 -tr T -p=P --npz -- x")
	f.Add("0 0 0 -p=")
	f.Fuzz(func(t *testing.T, line string) {
		a, err := ParseTrainArgs(strings.Fields(line))
		if err != nil {
			return
		}
		// Rebuilding and reparsing gives the same effective values.
		b, err := ParseTrainArgs(a.Argv(ArgvOptions{}))
		if err != nil {
			t.Fatalf("reparse of %q: %v", a.Argv(ArgvOptions{}), err)
		}
		a.toks, b.toks = nil, nil
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("round trip changed %+v to %+v", a, b)
		}
	})
}
