package nnunet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/nnguard/nnguard/internal/atomicfile"
)

// DefaultPlans is nnUNetv2_train's default -p identifier.
const DefaultPlans = "nnUNetPlans"

// Plans is a loaded nnU-Net plans file.
type Plans struct {
	Path        string // the file it was loaded from
	Identifier  string // file name without ".json": what -p takes
	Name        string // the internal "plans_name": names the results folder
	DatasetName string // the internal "dataset_name": names the results folder

	raw     []byte         // the file as read
	top     map[string]any // parsed (numbers as json.Number)
	configs map[string]any // top["configurations"]
	order   []string       // configuration names in file order
}

// PlansPath is where -p identifier points for a dataset folder from
// FindDataset: <datasetDir>/<identifier>.json.
func PlansPath(datasetDir, identifier string) string {
	return filepath.Join(datasetDir, identifier+".json")
}

// LoadPlans reads and parses a plans file. A missing or malformed file, or
// one without the fields nnU-Net needs (plans_name, dataset_name,
// configurations), wraps ErrConfig; the message names the file and, for
// JSON errors, the line, column and byte offset.
func LoadPlans(path string) (*Plans, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, configWrap(err, "nnunet: plans file %s not found (check -p); plans in that folder: %s", path, listPlans(filepath.Dir(path)))
	}
	if err != nil {
		return nil, configWrap(err, "nnunet: cannot read plans file %s: %v", path, err)
	}
	return parsePlans(path, raw)
}

func parsePlans(path string, raw []byte) (*Plans, error) {
	clean := sanitizeJSON(raw)
	dec := json.NewDecoder(bytes.NewReader(clean))
	dec.UseNumber()
	var top map[string]any
	if err := dec.Decode(&top); err != nil {
		return nil, configWrap(err, "nnunet: plans file %s is not valid JSON: %s", path, describeJSONError(clean, dec, err))
	}
	if _, err := dec.Token(); err != io.EOF {
		off := dec.InputOffset()
		return nil, configErrorf("nnunet: plans file %s is not valid JSON: extra data after the top-level object at %s", path, position(clean, off))
	}
	if top == nil {
		return nil, configErrorf("nnunet: plans file %s is not valid JSON: the top level is null, not an object", path)
	}
	p := &Plans{
		Path:       path,
		Identifier: strings.TrimSuffix(filepath.Base(path), ".json"),
		raw:        raw,
		top:        top,
	}
	var ok bool
	if p.Name, ok = top["plans_name"].(string); !ok {
		return nil, configErrorf("nnunet: plans file %s has no string \"plans_name\": is it an nnU-Net v2 plans file?", path)
	}
	if p.DatasetName, ok = top["dataset_name"].(string); !ok {
		return nil, configErrorf("nnunet: plans file %s has no string \"dataset_name\": is it an nnU-Net v2 plans file?", path)
	}
	if p.configs, ok = top["configurations"].(map[string]any); !ok {
		return nil, configErrorf("nnunet: plans file %s has no \"configurations\" object: is it an nnU-Net v2 plans file?", path)
	}
	order, err := configOrder(clean)
	if err != nil {
		return nil, configWrap(err, "nnunet: plans file %s: %v", path, err)
	}
	p.order = order
	return p, nil
}

// describeJSONError turns a decoding error into "<what> at line L, column C
// (byte B)".
func describeJSONError(data []byte, dec *json.Decoder, err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("%s at %s", se.Error(), position(data, se.Offset))
	case errors.As(err, &te):
		return fmt.Sprintf("the top level must be an object, found %s at %s", te.Value, position(data, te.Offset))
	case errors.Is(err, io.EOF):
		return "the file is empty"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Sprintf("unexpected end of file at %s", position(data, int64(len(data))))
	default:
		return fmt.Sprintf("%v at %s", err, position(data, dec.InputOffset()))
	}
}

// position renders a byte offset as "line L, column C (byte B)", 1-based.
func position(data []byte, off int64) string {
	if off < 0 {
		off = 0
	}
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line := bytes.Count(before, []byte{'\n'}) + 1
	col := int(off) - (bytes.LastIndexByte(before, '\n') + 1) + 1
	return fmt.Sprintf("line %d, column %d (byte %d)", line, col, off)
}

// sanitizeJSON returns data with Python's non-standard number literals
// (NaN, Infinity, -Infinity, which json.dump writes for float nan/inf)
// outside strings replaced by valid numbers of the same length, so that byte
// offsets stay the same. Python's json reads them; encoding/json does not.
func sanitizeJSON(data []byte) []byte {
	var out []byte
	inString, escaped := false, false
	for i := 0; i < len(data); i++ {
		c := data[i]
		if inString {
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			continue
		}
		if c == '"' {
			inString = true
			continue
		}
		for _, lit := range [...]struct{ from, to string }{
			{"-Infinity", "-1e999999"}, {"Infinity", "1e999999"}, {"NaN", "0.0"},
		} {
			if bytes.HasPrefix(data[i:], []byte(lit.from)) {
				if out == nil {
					out = bytes.Clone(data)
				}
				copy(out[i:], lit.to)
				i += len(lit.from) - 1
				break
			}
		}
	}
	if out == nil {
		return data
	}
	return out
}

// listPlans names the plans-looking .json files of a dataset folder.
func listPlans(dir string) string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "(cannot read the folder: " + err.Error() + ")"
	}
	var names []string
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || !strings.HasSuffix(n, ".json") {
			continue
		}
		switch n {
		case "dataset.json", "dataset_fingerprint.json", "splits_final.json":
			continue
		}
		names = append(names, strings.TrimSuffix(n, ".json"))
	}
	if len(names) == 0 {
		return "none"
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// Configurations lists the configuration names in file order.
func (p *Plans) Configurations() []string {
	return append([]string(nil), p.order...)
}

// Configuration returns the configuration resolved as nnU-Net's
// PlansManager does: if it has "inherits_from", a deep copy of the resolved
// parent is updated (shallowly) with the child's keys, recursively, with
// cycle detection. The result is a fresh deep copy (numbers are
// json.Number); "inherits_from" stays in it, as in nnU-Net. An unknown
// configuration wraps ErrConfig and lists the available ones.
func (p *Plans) Configuration(name string) (map[string]any, error) {
	return p.resolve(name, nil)
}

func (p *Plans) resolve(name string, visited []string) (map[string]any, error) {
	raw, ok := p.configs[name]
	if !ok {
		if len(visited) > 0 {
			return nil, configErrorf("nnunet: configuration %q in %s inherits from %q, which does not exist; available configurations: %s", visited[len(visited)-1], p.Path, name, strings.Join(p.order, ", "))
		}
		return nil, configErrorf("nnunet: configuration %q not found in plans %s; available configurations: %s", name, p.Path, strings.Join(p.order, ", "))
	}
	cfg, ok := raw.(map[string]any)
	if !ok {
		return nil, configErrorf("nnunet: configuration %q in %s is not an object", name, p.Path)
	}
	cfg = deepCopy(cfg).(map[string]any)
	parentRaw, inherits := cfg["inherits_from"]
	if !inherits {
		return cfg, nil
	}
	parent, ok := parentRaw.(string)
	if !ok {
		return nil, configErrorf("nnunet: configuration %q in %s has a non-string inherits_from", name, p.Path)
	}
	visited = append(visited[:len(visited):len(visited)], name)
	for _, v := range visited {
		if v == parent {
			return nil, configErrorf("nnunet: circular inherits_from in %s: %s -> %s", p.Path, strings.Join(visited, " -> "), parent)
		}
	}
	base, err := p.resolve(parent, visited)
	if err != nil {
		return nil, err
	}
	for k, v := range cfg {
		base[k] = v
	}
	return base, nil
}

func deepCopy(v any) any {
	switch t := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(t))
		for k, x := range t {
			m[k] = deepCopy(x)
		}
		return m
	case []any:
		s := make([]any, len(t))
		for i, x := range t {
			s[i] = deepCopy(x)
		}
		return s
	default:
		return v
	}
}

// BatchSize is the resolved configuration's batch_size (inherited if the
// configuration has none of its own). Errors wrap ErrConfig.
func (p *Plans) BatchSize(cfg string) (int, error) {
	c, err := p.Configuration(cfg)
	if err != nil {
		return 0, err
	}
	v, ok := c["batch_size"]
	if !ok {
		return 0, configErrorf("nnunet: configuration %q in %s has no batch_size", cfg, p.Path)
	}
	n, ok := v.(json.Number)
	if !ok {
		return 0, configErrorf("nnunet: batch_size of configuration %q in %s is not a number: %v", cfg, p.Path, v)
	}
	i, err := strconv.Atoi(string(n))
	if err != nil || i < 1 {
		return 0, configErrorf("nnunet: batch_size of configuration %q in %s is not a positive integer: %s", cfg, p.Path, n)
	}
	return i, nil
}

// derivedMarker separates the original identifier from nnguard's suffix in a
// derived identifier.
const derivedMarker = "__nnguard_"

// DerivedIdentifier names the plans file that Derive writes for one
// (configuration, fold, batch size):
//
//	<orig>__nnguard_<configuration>_f<fold>_bs<batchSize>
//
// e.g. nnUNetPlans__nnguard_3d_fullres_f0_bs4. orig is the identifier the
// user gave with -p; if it is itself a derived identifier, its nnguard
// suffix is dropped first, so names never chain. The fold is written in
// canonical form ("all" or an integer) and characters outside
// [A-Za-z0-9._-] in the configuration become '-'. Because the fold and the
// batch size never contain '_', the name read from the right is unique per
// (orig, configuration, fold, batch size): parallel folds and configurations
// of one dataset never share a derived file.
func DerivedIdentifier(orig, cfg string, fold string, batchSize int) string {
	if i := strings.Index(orig, derivedMarker); i >= 0 {
		orig = orig[:i]
	}
	if f, err := CanonicalFold(fold); err == nil {
		fold = f
	}
	return fmt.Sprintf("%s%s%s_f%s_bs%d", orig, derivedMarker, safeName(cfg), safeName(fold), batchSize)
}

// IsDerivedIdentifier reports whether id was made by DerivedIdentifier.
func IsDerivedIdentifier(id string) bool { return strings.Contains(id, derivedMarker) }

func safeName(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '-'
	}, s)
}

// Derive writes <folder of p.Path>/<identifier>.json atomically: the same
// bytes as p's file except that batch_size is set to batchSize inside
// configuration cfg (inserted as its first key when cfg inherits its batch
// size; the parent is not touched). Everything else, including plans_name
// (so nnU-Net keeps the same results folder and --c finds the
// checkpoints), key order, number formats and whitespace, stays as written.
//
// It never writes p.Path, and it overwrites an existing file only if that
// file is itself an nnguard-derived one (identifier containing
// "__nnguard_"), so a user's plans file is never replaced.
func (p *Plans) Derive(cfg string, batchSize int, identifier string) (string, error) {
	return p.DeriveIn(filepath.Dir(p.Path), cfg, batchSize, identifier)
}

// DeriveIn is Derive writing into dir instead of the plans' own folder (for
// a read-only nnUNet_preprocessed: nnU-Net joins the -p value onto the
// dataset folder with os.path.join, so an absolute -p <dir>/<identifier>
// loads it).
func (p *Plans) DeriveIn(dir, cfg string, batchSize int, identifier string) (string, error) {
	if identifier == "" || identifier != filepath.Base(identifier) || strings.ContainsAny(identifier, `/\`) || strings.HasPrefix(identifier, ".") {
		return "", fmt.Errorf("nnunet: derived plans identifier %q must be a plain file name without folders", identifier)
	}
	if strings.HasSuffix(identifier, ".json") {
		return "", fmt.Errorf("nnunet: derived plans identifier %q must not end in .json", identifier)
	}
	if identifier == p.Identifier {
		return "", fmt.Errorf("nnunet: refusing to overwrite the original plans %s: derive under a new identifier", p.Path)
	}
	if batchSize < 1 {
		return "", fmt.Errorf("nnunet: batch size %d for configuration %q: must be at least 1", batchSize, cfg)
	}
	if _, err := p.Configuration(cfg); err != nil {
		return "", err
	}
	dst := filepath.Join(dir, identifier+".json")
	if sameFile(dst, p.Path) {
		return "", fmt.Errorf("nnunet: refusing to overwrite the original plans %s: derive under a new identifier", p.Path)
	}
	if _, err := os.Lstat(dst); err == nil && !IsDerivedIdentifier(identifier) {
		return "", fmt.Errorf("nnunet: %s already exists and was not written by nnguard: choose another identifier", dst)
	}
	out, err := setBatchSize(p.raw, cfg, batchSize)
	if err != nil {
		return "", fmt.Errorf("nnunet: derive %s from %s: %w", identifier, p.Path, err)
	}
	if err := p.checkDerived(out, cfg, batchSize); err != nil {
		return "", fmt.Errorf("nnunet: derive %s from %s: %w", identifier, p.Path, err)
	}
	perm := fs.FileMode(0o644)
	if st, err := os.Stat(p.Path); err == nil {
		perm = st.Mode().Perm() | 0o200 // keep it writable by us for the next derive
	}
	if err := atomicfile.WriteFile(dst, out, perm); err != nil {
		return "", fmt.Errorf("nnunet: write derived plans: %w", err)
	}
	return dst, nil
}

func sameFile(a, b string) bool {
	sa, err := os.Stat(a)
	if err != nil {
		return false
	}
	sb, err := os.Stat(b)
	return err == nil && os.SameFile(sa, sb)
}

// checkDerived re-parses the derived bytes and verifies that they differ
// from p only by batch_size inside configuration cfg.
func (p *Plans) checkDerived(out []byte, cfg string, batchSize int) error {
	d, err := parsePlans(p.Path, out)
	if err != nil {
		return fmt.Errorf("derived plans do not parse: %w", err)
	}
	want := deepCopy(p.top).(map[string]any)
	want["configurations"].(map[string]any)[cfg].(map[string]any)["batch_size"] = json.Number(strconv.Itoa(batchSize))
	if !reflect.DeepEqual(want, d.top) {
		return errors.New("derived plans differ from the original in more than batch_size (internal error)")
	}
	if got, err := d.BatchSize(cfg); err != nil || got != batchSize {
		return fmt.Errorf("derived plans have batch size %d, want %d (internal error)", got, batchSize)
	}
	return nil
}

// edit replaces raw[start:end] with text.
type edit struct {
	start, end int
	text       string
}

// setBatchSize returns raw with batch_size = n in every occurrence of
// configurations.<cfg> (duplicate keys are all edited, so Python's
// last-one-wins reading sees the change too).
func setBatchSize(raw []byte, cfg string, n int) ([]byte, error) {
	clean := sanitizeJSON(raw)
	dec := json.NewDecoder(bytes.NewReader(clean))
	dec.UseNumber()
	var edits []edit
	value := strconv.Itoa(n)
	defaultSep := ""
	err := walkObject(dec, clean, func(key string, keyEnd int) error {
		if defaultSep == "" {
			defaultSep = string(clean[keyEnd:skipSpaceColon(clean, keyEnd)])
		}
		if key != "configurations" {
			return skipValue(dec)
		}
		if !nextIsObject(dec, clean) {
			return skipValue(dec)
		}
		return walkObject(dec, clean, func(name string, _ int) error {
			if name != cfg {
				return skipValue(dec)
			}
			if !nextIsObject(dec, clean) {
				return fmt.Errorf("configuration %q is not an object", cfg)
			}
			open := -1
			found := false
			first := true
			sep := defaultSep
			err := walkObject(dec, clean, func(k string, keyEnd int) error {
				vs := skipSpaceColon(clean, keyEnd)
				if first {
					sep = string(clean[keyEnd:vs])
					first = false
				}
				if k != "batch_size" {
					return skipValue(dec)
				}
				if err := skipValue(dec); err != nil {
					return err
				}
				edits = append(edits, edit{vs, int(dec.InputOffset()), value})
				found = true
				return nil
			}, func(openEnd int) { open = openEnd })
			if err != nil {
				return err
			}
			if !found {
				ws := clean[open:skipSpace(clean, open)]
				text := `"batch_size"` + sep + value
				if clean[skipSpace(clean, open)] != '}' {
					text = string(ws) + text + ","
				}
				edits = append(edits, edit{open, open, text})
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	if len(edits) == 0 {
		return nil, fmt.Errorf("configuration %q not found", cfg)
	}
	out := bytes.Clone(raw)
	for i := len(edits) - 1; i >= 0; i-- {
		e := edits[i]
		out = append(out[:e.start:e.start], append([]byte(e.text), out[e.end:]...)...)
	}
	return out, nil
}

// configOrder returns the keys of the top-level "configurations" object in
// file order (the last "configurations" wins, as in Python).
func configOrder(clean []byte) ([]string, error) {
	dec := json.NewDecoder(bytes.NewReader(clean))
	dec.UseNumber()
	var order []string
	err := walkObject(dec, clean, func(key string, _ int) error {
		if key != "configurations" || !nextIsObject(dec, clean) {
			return skipValue(dec)
		}
		order = order[:0]
		seen := map[string]bool{}
		return walkObject(dec, clean, func(name string, _ int) error {
			if !seen[name] {
				seen[name] = true
				order = append(order, name)
			}
			return skipValue(dec)
		})
	})
	return order, err
}

// walkObject reads an object from dec (its '{' must be next) and calls fn
// for each key with the byte offset just past the key; fn must consume the
// value. onOpen, if given, receives the offset just past '{'.
func walkObject(dec *json.Decoder, data []byte, fn func(key string, keyEnd int) error, onOpen ...func(openEnd int)) error {
	t, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := t.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("expected an object at %s", position(data, dec.InputOffset()))
	}
	for _, f := range onOpen {
		f(int(dec.InputOffset()))
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		key, ok := t.(string)
		if !ok {
			return fmt.Errorf("expected a key at %s", position(data, dec.InputOffset()))
		}
		if err := fn(key, int(dec.InputOffset())); err != nil {
			return err
		}
	}
	_, err = dec.Token() // '}'
	return err
}

func skipValue(dec *json.Decoder) error {
	var rm json.RawMessage
	return dec.Decode(&rm)
}

// nextIsObject reports whether the value that follows the key just read
// starts with '{'.
func nextIsObject(dec *json.Decoder, data []byte) bool {
	i := skipSpaceColon(data, int(dec.InputOffset()))
	return i < len(data) && data[i] == '{'
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

func skipSpaceColon(data []byte, i int) int {
	i = skipSpace(data, i)
	if i < len(data) && data[i] == ':' {
		i++
	}
	return skipSpace(data, i)
}
