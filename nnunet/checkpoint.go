package nnunet

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nlpodyssey/gopickle/pickle"
	"github.com/nlpodyssey/gopickle/types"
)

// Checkpoint file names in a fold folder, in the order nnU-Net's --c looks
// for them.
const (
	CheckpointFinal  = "checkpoint_final.pth"
	CheckpointLatest = "checkpoint_latest.pth"
	CheckpointBest   = "checkpoint_best.pth"
)

// Checkpoint is what Inspect learned about one checkpoint file.
type Checkpoint struct {
	Name    string // base name, e.g. checkpoint_latest.pth
	Path    string
	Exists  bool
	Valid   bool  // a complete torch zip whose data.pkl loads and has current_epoch
	Err     error // why an existing file is not valid (nil when valid or missing)
	Epoch   int   // current_epoch: the next epoch to run (final: num_epochs); -1 if unknown
	Size    int64
	ModTime time.Time
}

// maxPickleSize bounds data.pkl (a real nnU-Net one is well under 10 MB;
// tensors live in separate entries).
const maxPickleSize = 64 << 20

// Inspect checks a checkpoint file without torch: it must be a complete zip
// archive (central directory present, every entry inside the file), hold a
// "<stem>/data.pkl" entry whose pickle loads (tensors are persistent ids and
// torch/numpy classes become inert placeholders; nothing is executed and no
// tensor is read), whose tensors' storage entries all exist, and whose
// top-level dict has an integer current_epoch. A missing file gives
// Exists == false and Err == nil.
func Inspect(path string) Checkpoint {
	c := Checkpoint{Name: filepath.Base(path), Path: path, Epoch: -1}
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c
	}
	c.Exists = true
	if err != nil {
		c.Err = fmt.Errorf("nnunet: checkpoint %s: %w", path, err)
		return c
	}
	c.Size, c.ModTime = st.Size(), st.ModTime()
	if !st.Mode().IsRegular() {
		c.Err = fmt.Errorf("nnunet: checkpoint %s is not a regular file", path)
		return c
	}
	f, err := os.Open(path)
	if err != nil {
		c.Err = fmt.Errorf("nnunet: checkpoint %s: %w", path, err)
		return c
	}
	defer f.Close()
	epoch, err := readCheckpoint(f, st.Size())
	if err != nil {
		c.Err = fmt.Errorf("nnunet: checkpoint %s is not usable: %w", path, err)
		return c
	}
	c.Valid, c.Epoch = true, epoch
	return c
}

// readCheckpoint validates a torch zip checkpoint and returns current_epoch.
func readCheckpoint(r io.ReaderAt, size int64) (int, error) {
	zr, err := zip.NewReader(r, size)
	if err != nil {
		return -1, fmt.Errorf("not a complete zip archive (truncated while saving?): %w", err)
	}
	var pkl *zip.File
	entries := make(map[string]bool, len(zr.File))
	for _, f := range zr.File {
		entries[f.Name] = true
		off, err := f.DataOffset()
		if err != nil {
			return -1, fmt.Errorf("entry %s: %w", f.Name, err)
		}
		if f.CompressedSize64 > uint64(size) || off+int64(f.CompressedSize64) > size {
			return -1, fmt.Errorf("entry %s extends past the end of the file (truncated?)", f.Name)
		}
		if pkl == nil {
			if dir, base := pathSplit(f.Name); dir != "" && !strings.Contains(dir, "/") && base == "data.pkl" {
				pkl = f
			}
		}
	}
	if pkl == nil {
		return -1, errors.New("no <name>/data.pkl entry: not a torch checkpoint")
	}
	if pkl.UncompressedSize64 > maxPickleSize {
		return -1, fmt.Errorf("%s is %d bytes, more than the %d allowed", pkl.Name, pkl.UncompressedSize64, maxPickleSize)
	}
	rc, err := pkl.Open()
	if err != nil {
		return -1, fmt.Errorf("%s: %w", pkl.Name, err)
	}
	data, err := io.ReadAll(io.LimitReader(rc, maxPickleSize+1))
	rc.Close()
	if err != nil {
		return -1, fmt.Errorf("read %s: %w", pkl.Name, err)
	}
	if len(data) > maxPickleSize {
		return -1, fmt.Errorf("%s is larger than the %d bytes allowed", pkl.Name, maxPickleSize)
	}
	v, storages, err := unpickle(data)
	if err != nil {
		return -1, fmt.Errorf("%s does not load: %w", pkl.Name, err)
	}
	prefix, _ := pathSplit(pkl.Name)
	for _, key := range storages {
		if !entries[prefix+"/data/"+key] {
			return -1, fmt.Errorf("tensor storage %s/data/%s is missing", prefix, key)
		}
	}
	epoch, err := currentEpoch(v)
	if err != nil {
		return -1, fmt.Errorf("%s: %w", pkl.Name, err)
	}
	return epoch, nil
}

func pathSplit(name string) (dir, base string) {
	i := strings.LastIndexByte(name, '/')
	if i < 0 {
		return "", name
	}
	return name[:i], name[i+1:]
}

func currentEpoch(v any) (int, error) {
	var (
		e  any
		ok bool
	)
	switch d := v.(type) {
	case *types.Dict:
		e, ok = d.Get("current_epoch")
	case *types.OrderedDict:
		e, ok = d.Get("current_epoch")
	default:
		return -1, fmt.Errorf("top level is %T, not a dict", v)
	}
	if !ok {
		return -1, errors.New("no current_epoch key: not an nnU-Net checkpoint")
	}
	var n int64
	switch t := e.(type) {
	case int:
		n = int64(t)
	case int64:
		n = t
	case *big.Int:
		if !t.IsInt64() {
			return -1, fmt.Errorf("current_epoch %s out of range", t)
		}
		n = t.Int64()
	default:
		return -1, fmt.Errorf("current_epoch is %T, not an integer", e)
	}
	if n < 0 || n > 1<<31-1 {
		return -1, fmt.Errorf("current_epoch %d out of range", n)
	}
	return int(n), nil
}

// pyStub stands in for every Python class or function a checkpoint names
// (torch._utils._rebuild_tensor_v2, torch.FloatStorage, torch.device,
// numpy.core.multiarray.scalar, numpy.dtype, _codecs.encode, ...): calling
// or instantiating it accepts any arguments and returns an inert pyObject.
type pyStub struct{ Module, Name string }

func (s *pyStub) Call(args ...any) (any, error)  { return &pyObject{Class: s, Args: args}, nil }
func (s *pyStub) PyNew(args ...any) (any, error) { return &pyObject{Class: s, Args: args}, nil }

// pyObject is an inert placeholder object: it accepts state, attributes and
// calls, and does nothing.
type pyObject struct {
	Class *pyStub
	Args  []any
	State any
}

func (o *pyObject) Call(args ...any) (any, error)     { return &pyObject{Class: o.Class, Args: args}, nil }
func (o *pyObject) PyNew(args ...any) (any, error)    { return &pyObject{Class: o.Class, Args: args}, nil }
func (o *pyObject) PySetState(state any) error        { o.State = state; return nil }
func (o *pyObject) PyDictSet(key, value any) error    { return nil }
func (o *pyObject) PySetAttr(key string, v any) error { return nil }

// unpickle loads a torch data.pkl without torch. It returns the value and
// the storage keys of the tensors it references.
func unpickle(data []byte) (v any, storages []string, err error) {
	if err := scanPickle(data); err != nil {
		return nil, nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			v, storages, err = nil, nil, fmt.Errorf("malformed pickle: %v", r)
		}
	}()
	u := pickle.NewUnpickler(bytes.NewReader(data))
	u.FindClass = func(module, name string) (any, error) {
		return &pyStub{Module: module, Name: name}, nil
	}
	u.PersistentLoad = func(pid any) (any, error) {
		// torch: ('storage', storage_type, key, location, numel)
		if t, ok := pid.(*types.Tuple); ok && t.Len() >= 3 {
			if kind, _ := t.Get(0).(string); kind == "storage" {
				if key, ok := t.Get(2).(string); ok {
					storages = append(storages, key)
				}
			}
		}
		return &pyObject{Class: &pyStub{Module: "torch", Name: "storage"}, Args: []any{pid}}, nil
	}
	v, err = u.Load()
	if err != nil {
		return nil, nil, err
	}
	return v, storages, nil
}

// scanPickle walks the opcodes of a pickle and checks that every length it
// declares fits in the data, before the unpickler allocates anything. It
// also rejects unknown opcodes and a missing STOP.
func scanPickle(data []byte) error {
	i := 0
	need := func(n uint64) error {
		if n > uint64(len(data)-i) {
			return fmt.Errorf("truncated pickle: opcode at byte %d needs %d bytes, %d left", i, n, len(data)-i)
		}
		return nil
	}
	line := func() error {
		j := bytes.IndexByte(data[i:], '\n')
		if j < 0 {
			return fmt.Errorf("truncated pickle: no end of line after byte %d", i)
		}
		i += j + 1
		return nil
	}
	for i < len(data) {
		op := data[i]
		i++
		var err error
		switch op {
		case '.': // STOP
			return nil
		case '(', ')', '0', '1', '2', 'N', 'Q', 'R', 'a', 'b', 'd', 'e', 'l', 'o', 's', 't', 'u', '}', ']',
			0x81, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8f, 0x90, 0x91, 0x92, 0x93, 0x94, 0x97, 0x98:
		case 'K', 'h', 'q', 0x80, 0x82: // 1-byte argument
			err = need(1)
			i++
		case 'M', 0x83: // 2-byte argument
			err = need(2)
			i += 2
		case 'J', 'j', 'r', 0x84: // 4-byte argument
			err = need(4)
			i += 4
		case 'G': // BINFLOAT
			err = need(8)
			i += 8
		case 'U', 'C', 0x8c, 0x8a: // 1-byte length + data
			if err = need(1); err == nil {
				n := uint64(data[i])
				i++
				if err = need(n); err == nil {
					i += int(n)
				}
			}
		case 'T', 'X', 'B', 0x8b: // 4-byte length + data
			if err = need(4); err == nil {
				n := binary.LittleEndian.Uint32(data[i:])
				i += 4
				if (op == 'T' || op == 0x8b) && int32(n) < 0 {
					return fmt.Errorf("malformed pickle: negative length at byte %d", i-5)
				}
				if err = need(uint64(n)); err == nil {
					i += int(n)
				}
			}
		case 0x8d, 0x8e, 0x96, 0x95: // 8-byte length (+ data, except FRAME)
			if err = need(8); err == nil {
				n := binary.LittleEndian.Uint64(data[i:])
				i += 8
				if err = need(n); err == nil && op != 0x95 {
					i += int(n)
				}
			}
		case 'I', 'L', 'S', 'V', 'F', 'g', 'p', 'P': // newline-terminated argument
			err = line()
		case 'c', 'i': // GLOBAL, INST: module\nname\n
			if err = line(); err == nil {
				err = line()
			}
		default:
			return fmt.Errorf("malformed pickle: unknown opcode 0x%02x at byte %d", op, i-1)
		}
		if err != nil {
			return err
		}
	}
	return errors.New("truncated pickle: no STOP opcode")
}
