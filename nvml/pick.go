package nvml

import (
	"fmt"
	"strconv"
	"strings"
)

// Pick chooses the device for "--gpu auto": the one with the most free memory
// (the lowest index among equals) among those that visible (the value of
// CUDA_VISIBLE_DEVICES) allows. It returns the device's NVML index.
//
// visible is read as CUDA reads it: empty means every device; otherwise a
// comma-separated list of indices or UUIDs ("GPU-…", a unique prefix is
// enough), and reading stops at the first entry that names no device (so
// "-1" or "" hides all that follow). Indices are NVML's, which match CUDA's
// only under CUDA_DEVICE_ORDER=PCI_BUS_ID; pass the picked device's UUID to
// the trainer to be safe. MIG UUIDs are not resolved (they end the list).
func Pick(devs []Device, visible string) (int, error) {
	allowed, err := Visible(devs, visible)
	if err != nil {
		return -1, err
	}
	best := -1
	for _, i := range allowed {
		d := devs[i]
		if best < 0 || d.FreeBytes > devs[best].FreeBytes ||
			(d.FreeBytes == devs[best].FreeBytes && d.Index < devs[best].Index) {
			best = i
		}
	}
	return devs[best].Index, nil
}

// Visible returns the positions in devs that CUDA_VISIBLE_DEVICES=visible
// allows, in the order it lists them (see Pick). It fails with ErrNoDevice
// when none is allowed.
func Visible(devs []Device, visible string) ([]int, error) {
	if len(devs) == 0 {
		return nil, fmt.Errorf("nvml: pick: %w: no GPU found", ErrNoDevice)
	}
	visible = strings.TrimSpace(visible)
	var out []int
	if visible == "" {
		for i := range devs {
			out = append(out, i)
		}
		return out, nil
	}
	seen := map[int]bool{}
	for _, entry := range strings.Split(visible, ",") {
		pos := lookup(devs, strings.TrimSpace(entry))
		if pos < 0 {
			break // CUDA ignores everything from an invalid entry on
		}
		if !seen[pos] {
			seen[pos] = true
			out = append(out, pos)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("nvml: pick: %w: CUDA_VISIBLE_DEVICES=%q allows none of %d GPUs", ErrNoDevice, visible, len(devs))
	}
	return out, nil
}

// lookup returns the position in devs of one CUDA_VISIBLE_DEVICES entry, or -1.
func lookup(devs []Device, entry string) int {
	if n, err := strconv.Atoi(entry); err == nil {
		for i, d := range devs {
			if d.Index == n {
				return i
			}
		}
		return -1
	}
	if !strings.HasPrefix(entry, "GPU-") {
		return -1
	}
	found := -1
	for i, d := range devs {
		if strings.HasPrefix(d.UUID, entry) {
			if found >= 0 {
				return -1 // ambiguous prefix
			}
			found = i
		}
	}
	return found
}
