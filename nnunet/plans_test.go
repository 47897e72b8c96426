package nnunet

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// plansJSON is shaped like a real nnU-Net v2 plans file (json.dump,
// indent 4, sort_keys False), with a cascade and a custom inheriting
// configuration.
const plansJSON = `{
    "dataset_name": "Dataset004_Hippocampus",
    "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [
        1.0,
        1.0,
        1.0
    ],
    "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [
        0,
        1,
        2
    ],
    "configurations": {
        "2d": {
            "data_identifier": "nnUNetPlans_2d",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 366,
            "patch_size": [
                56,
                40
            ],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4,
                    "norm_op_kwargs": {
                        "eps": 1e-05,
                        "affine": true
                    },
                    "dropout_op": null,
                    "nonlin_kwargs": {
                        "inplace": true
                    }
                }
            },
            "batch_dice": true
        },
        "3d_lowres": {
            "data_identifier": "nnUNetPlans_3d_lowres",
            "batch_size": 9,
            "patch_size": [40, 56, 40],
            "spacing": [1.5, 1.0000000000000002, 1.0],
            "next_stage": "3d_cascade_fullres"
        },
        "3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "batch_size": 9,
            "patch_size": [
                40,
                56,
                40
            ],
            "normalization_schemes": [
                "ZScoreNormalization"
            ],
            "architecture": {
                "network_class_name": "PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4
                }
            }
        },
        "3d_cascade_fullres": {
            "inherits_from": "3d_fullres",
            "previous_stage": "3d_lowres"
        },
        "3d_fullres_custom": {
            "inherits_from": "3d_cascade_fullres",
            "architecture": {
                "network_class_name": "Other"
            }
        }
    },
    "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        "0": {
            "max": 486420.21875,
            "mean": 365623.5,
            "percentile_00_5": 0.1,
            "std": 1.23e-07
        }
    },
    "zz_unknown_key": {"b": 1, "a": 2}
}
`

func writePlans(t *testing.T, content string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "Dataset004_Hippocampus")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "nnUNetPlans.json")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func loadTestPlans(t *testing.T) *Plans {
	t.Helper()
	p, err := LoadPlans(writePlans(t, plansJSON))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadPlans(t *testing.T) {
	p := loadTestPlans(t)
	if p.Identifier != "nnUNetPlans" || p.Name != "nnUNetPlans" || p.DatasetName != "Dataset004_Hippocampus" {
		t.Fatalf("fields: %q %q %q", p.Identifier, p.Name, p.DatasetName)
	}
	want := "2d,3d_lowres,3d_fullres,3d_cascade_fullres,3d_fullres_custom"
	if got := strings.Join(p.Configurations(), ","); got != want {
		t.Fatalf("configurations %s, want %s", got, want)
	}
	for cfg, bs := range map[string]int{"2d": 366, "3d_fullres": 9, "3d_cascade_fullres": 9, "3d_fullres_custom": 9} {
		if got, err := p.BatchSize(cfg); err != nil || got != bs {
			t.Errorf("BatchSize(%s) = %d, %v; want %d", cfg, got, err, bs)
		}
	}
}

func TestConfigurationInheritance(t *testing.T) {
	p := loadTestPlans(t)
	c, err := p.Configuration("3d_cascade_fullres")
	if err != nil {
		t.Fatal(err)
	}
	if c["inherits_from"] != "3d_fullres" || c["previous_stage"] != "3d_lowres" || c["data_identifier"] != "nnUNetPlans_3d_fullres" {
		t.Fatalf("cascade: %v", c)
	}
	// Two levels, shallow update: the child's architecture replaces the
	// parent's whole dict (no arch_kwargs).
	c, err = p.Configuration("3d_fullres_custom")
	if err != nil {
		t.Fatal(err)
	}
	arch := c["architecture"].(map[string]any)
	if arch["network_class_name"] != "Other" || arch["arch_kwargs"] != nil || c["previous_stage"] != "3d_lowres" || c["inherits_from"] != "3d_cascade_fullres" {
		t.Fatalf("custom: %v", c)
	}
	// Deep copy: changing the result does not change the plans.
	c["patch_size"].([]any)[0] = json.Number("1")
	c2, _ := p.Configuration("3d_fullres")
	if c2["patch_size"].([]any)[0] != json.Number("40") {
		t.Fatal("Configuration returned shared state")
	}
}

func TestConfigurationErrors(t *testing.T) {
	p := loadTestPlans(t)
	_, err := p.Configuration("3d_nope")
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "2d, 3d_lowres, 3d_fullres, 3d_cascade_fullres, 3d_fullres_custom") {
		t.Fatalf("unknown configuration: %v", err)
	}
	if _, err := p.BatchSize("3d_nope"); !errors.Is(err, ErrConfig) {
		t.Fatalf("BatchSize unknown: %v", err)
	}
	circular := `{"plans_name": "P", "dataset_name": "D", "configurations": {
		"a": {"inherits_from": "b"}, "b": {"inherits_from": "a"}, "s": {"inherits_from": "s"},
		"m": {"inherits_from": "missing"}, "ok": {"batch_size": 2}, "c": {"inherits_from": "ok"}}}`
	p, err = LoadPlans(writePlans(t, circular))
	if err != nil {
		t.Fatal(err)
	}
	for _, cfg := range []string{"a", "b", "s"} {
		if _, err := p.Configuration(cfg); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "circular") {
			t.Errorf("%s: %v", cfg, err)
		}
	}
	if _, err := p.Configuration("m"); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), `inherits from "missing"`) {
		t.Errorf("missing parent: %v", err)
	}
	if bs, err := p.BatchSize("c"); err != nil || bs != 2 {
		t.Errorf("c: %d %v", bs, err)
	}
}

func TestLoadPlansMalformed(t *testing.T) {
	for name, tc := range map[string]struct{ content, want string }{
		"syntax":    {"{\n  \"plans_name\": \"x\",\n  \"configurations\": {,}\n}", "line 3, column"},
		"truncated": {plansJSON[:200], "unexpected end of file"},
		"empty":     {"", "empty"},
		"array":     {"[1, 2]", "top level must be an object"},
		"trailing":  {`{"plans_name": "a", "dataset_name": "b", "configurations": {}} x`, "extra data"},
		"noname":    {`{"dataset_name": "b", "configurations": {}}`, "plans_name"},
		"noconfigs": {`{"plans_name": "a", "dataset_name": "b"}`, "configurations"},
	} {
		t.Run(name, func(t *testing.T) {
			path := writePlans(t, tc.content)
			_, err := LoadPlans(path)
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v; want ErrConfig naming %s and %q", err, path, tc.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error: %q", err)
			}
		})
	}
	_, err := LoadPlans(filepath.Join(filepath.Dir(writePlans(t, plansJSON)), "nnUNetResEncUNetLPlans.json"))
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "plans in that folder: nnUNetPlans") {
		t.Fatalf("missing plans: %v", err)
	}
}

func TestLoadPlansPythonNaN(t *testing.T) {
	content := strings.Replace(plansJSON, `"mean": 365623.5`, `"mean": NaN, "min": -Infinity, "note": "NaN Infinity"`, 1)
	p, err := LoadPlans(writePlans(t, content))
	if err != nil {
		t.Fatal(err)
	}
	out, err := p.Derive("3d_fullres", 4, "x__nnguard_3d_fullres_f0_bs4")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	if !bytes.Contains(b, []byte(`"mean": NaN, "min": -Infinity, "note": "NaN Infinity"`)) {
		t.Fatal("NaN/Infinity not preserved")
	}
}

// keyPaths lists every object key with its path, in document order.
func keyPaths(t *testing.T, data []byte) []string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(sanitizeJSON(data)))
	var out []string
	var walk func(prefix string) error
	walk = func(prefix string) error {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		switch tok {
		case json.Delim('{'):
			for dec.More() {
				k, _ := dec.Token()
				out = append(out, prefix+"/"+k.(string))
				if err := walk(prefix + "/" + k.(string)); err != nil {
					return err
				}
			}
			dec.Token()
		case json.Delim('['):
			for dec.More() {
				if err := walk(prefix + "/[]"); err != nil {
					return err
				}
			}
			dec.Token()
		}
		return nil
	}
	if err := walk(""); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestDerive(t *testing.T) {
	p := loadTestPlans(t)
	id := DerivedIdentifier(p.Identifier, "3d_fullres", "0", 4)
	out, err := p.Derive("3d_fullres", 4, id)
	if err != nil {
		t.Fatal(err)
	}
	if out != filepath.Join(filepath.Dir(p.Path), id+".json") {
		t.Fatalf("path %s", out)
	}
	orig, _ := os.ReadFile(p.Path)
	if string(orig) != plansJSON {
		t.Fatal("original plans changed")
	}
	got, _ := os.ReadFile(out)
	// Exactly one change: the batch_size inside 3d_fullres.
	want := strings.Replace(plansJSON, `"nnUNetPlans_3d_fullres",
            "batch_size": 9,`, `"nnUNetPlans_3d_fullres",
            "batch_size": 4,`, 1)
	if string(got) != want {
		t.Fatalf("derived plans:\n%s", got)
	}
	d, err := LoadPlans(out)
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "nnUNetPlans" || d.Identifier != id || d.DatasetName != p.DatasetName {
		t.Fatalf("derived fields %q %q %q", d.Name, d.Identifier, d.DatasetName)
	}
	for cfg, bs := range map[string]int{"3d_fullres": 4, "3d_cascade_fullres": 4, "2d": 366, "3d_lowres": 9} {
		if got, _ := d.BatchSize(cfg); got != bs {
			t.Errorf("derived BatchSize(%s) = %d, want %d", cfg, got, bs)
		}
	}
	// Derive again over our own file (another batch size): allowed.
	if _, err := p.Derive("3d_fullres", 3, id); err != nil {
		t.Fatal(err)
	}
	// Results folder stays the same.
	env := Env{Results: "/r"}
	if FoldDir(env, d.DatasetName, "nnUNetTrainer", d.Name, "3d_fullres", "0") != FoldDir(env, p.DatasetName, "nnUNetTrainer", p.Name, "3d_fullres", "0") {
		t.Fatal("derived plans change the results folder")
	}
}

func TestDeriveInheritingChild(t *testing.T) {
	p := loadTestPlans(t)
	out, err := p.Derive("3d_cascade_fullres", 2, DerivedIdentifier(p.Identifier, "3d_cascade_fullres", "all", 2))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Contains(got, []byte(`"3d_cascade_fullres": {
            "batch_size": 2,
            "inherits_from": "3d_fullres",`)) {
		t.Fatalf("batch_size not inserted in the child:\n%s", got)
	}
	d, err := LoadPlans(out)
	if err != nil {
		t.Fatal(err)
	}
	for cfg, bs := range map[string]int{"3d_cascade_fullres": 2, "3d_fullres": 9, "3d_fullres_custom": 2} {
		if got, _ := d.BatchSize(cfg); got != bs {
			t.Errorf("BatchSize(%s) = %d, want %d", cfg, got, bs)
		}
	}
	// Key order: the original keys in the original order, plus the new one.
	origKeys := keyPaths(t, []byte(plansJSON))
	var newKeys []string
	for _, k := range keyPaths(t, got) {
		if k != "/configurations/3d_cascade_fullres/batch_size" {
			newKeys = append(newKeys, k)
		}
	}
	if strings.Join(origKeys, "\n") != strings.Join(newKeys, "\n") {
		t.Fatal("key order changed")
	}
	for _, lit := range []string{"1e-05", "1.23e-07", "0.1", "1.0000000000000002", "486420.21875", `"zz_unknown_key": {"b": 1, "a": 2}`} {
		if !bytes.Contains(got, []byte(lit)) {
			t.Errorf("%s not preserved", lit)
		}
	}
}

func TestDeriveCompactAndEmpty(t *testing.T) {
	content := `{"plans_name":"P","dataset_name":"D","configurations":{"a":{"batch_size":8,"x":1},"b":{"inherits_from":"a"},"e":{}}}`
	p, err := LoadPlans(writePlans(t, content))
	if err != nil {
		t.Fatal(err)
	}
	for cfg, want := range map[string]string{
		"a": `"a":{"batch_size":2,"x":1}`,
		"b": `"b":{"batch_size":2,"inherits_from":"a"}`,
		"e": `"e":{"batch_size":2}`,
	} {
		out, err := p.Derive(cfg, 2, DerivedIdentifier("P", cfg, "1", 2))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(out)
		if !bytes.Contains(got, []byte(want)) {
			t.Errorf("%s: %s", cfg, got)
		}
	}
}

func TestDeriveRefusals(t *testing.T) {
	p := loadTestPlans(t)
	for _, id := range []string{"nnUNetPlans", "", "../x", "a/b", ".hidden", "x.json"} {
		if _, err := p.Derive("3d_fullres", 2, id); err == nil {
			t.Errorf("Derive to %q succeeded", id)
		}
	}
	if _, err := p.Derive("nope", 2, "x__nnguard_nope_f0_bs2"); !errors.Is(err, ErrConfig) {
		t.Errorf("unknown configuration: %v", err)
	}
	if _, err := p.Derive("3d_fullres", 0, "x__nnguard_3d_fullres_f0_bs0"); err == nil {
		t.Error("batch size 0 accepted")
	}
	// A user's plans file is never replaced.
	user := filepath.Join(filepath.Dir(p.Path), "nnUNetPlans_bs2.json")
	os.WriteFile(user, []byte("mine"), 0o644)
	if _, err := p.Derive("3d_fullres", 2, "nnUNetPlans_bs2"); err == nil {
		t.Error("overwrote a user's plans file")
	}
	if b, _ := os.ReadFile(user); string(b) != "mine" {
		t.Error("user's file changed")
	}
	// A new, non-nnguard identifier is fine when the file does not exist.
	if _, err := p.Derive("3d_fullres", 2, "nnUNetPlans_bs2b"); err != nil {
		t.Error(err)
	}
}

func TestDeriveUnwritableFolder(t *testing.T) {
	p := loadTestPlans(t)
	dir := filepath.Dir(p.Path)
	// Replace the folder by a file: works as root too.
	moved := dir + ".moved"
	if err := os.Rename(dir, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, []byte("not a folder"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Derive("3d_fullres", 2, "x__nnguard_3d_fullres_f0_bs2"); err == nil {
		t.Fatal("Derive into a missing folder succeeded")
	}
	os.Remove(dir)
	os.Rename(moved, dir)
	if os.Geteuid() != 0 {
		os.Chmod(dir, 0o555)
		defer os.Chmod(dir, 0o755)
		if _, err := p.Derive("3d_fullres", 2, "x__nnguard_3d_fullres_f0_bs2"); err == nil {
			t.Fatal("Derive into a read-only folder succeeded")
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != "nnUNetPlans.json" {
		t.Fatalf("something was half-written: %v", entries)
	}
}

func TestDerivedIdentifier(t *testing.T) {
	for _, tc := range []struct {
		orig, cfg, fold string
		bs              int
		want            string
	}{
		{"nnUNetPlans", "3d_fullres", "0", 4, "nnUNetPlans__nnguard_3d_fullres_f0_bs4"},
		{"nnUNetPlans", "2d", "all", 2, "nnUNetPlans__nnguard_2d_fall_bs2"},
		{"nnUNetPlans", "2d", "01", 2, "nnUNetPlans__nnguard_2d_f1_bs2"},
		{"nnUNetPlans__nnguard_2d_f1_bs4", "2d", "1", 2, "nnUNetPlans__nnguard_2d_f1_bs2"},
		{"nnUNetResEncUNetLPlans", "3d fullres/x", "3", 12, "nnUNetResEncUNetLPlans__nnguard_3d-fullres-x_f3_bs12"},
	} {
		if got := DerivedIdentifier(tc.orig, tc.cfg, tc.fold, tc.bs); got != tc.want {
			t.Errorf("DerivedIdentifier(%q,%q,%q,%d) = %q, want %q", tc.orig, tc.cfg, tc.fold, tc.bs, got, tc.want)
		}
	}
	// No collisions between parallel folds and configurations.
	seen := map[string]bool{}
	for _, cfg := range []string{"2d", "3d_fullres", "3d_fullres_f0", "3d_lowres", "3d_cascade_fullres"} {
		for _, fold := range []string{"0", "1", "10", "all"} {
			for _, bs := range []int{1, 2, 10} {
				id := DerivedIdentifier("nnUNetPlans", cfg, fold, bs)
				if seen[id] {
					t.Fatalf("collision: %s", id)
				}
				seen[id] = true
			}
		}
	}
}
