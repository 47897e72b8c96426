package doctor

import (
	"fmt"
	"slices"
	"strings"
)

// Text renders the report for a terminal.
func (r Report) Text() string {
	var b strings.Builder
	line := func(label, format string, a ...any) {
		fmt.Fprintf(&b, "%-20s %s\n", label, fmt.Sprintf(format, a...))
	}

	if r.GPUOff != "" {
		line("GPU", "monitoring off: %s", r.GPUOff)
	}
	for _, d := range r.GPUs {
		extra := ""
		if d.UtilPercent >= 0 {
			extra += fmt.Sprintf(", %d%% busy", d.UtilPercent)
		}
		if d.TempC >= 0 {
			extra += fmt.Sprintf(", %d°C", d.TempC)
		}
		line(fmt.Sprintf("GPU %d", d.Index), "%s (%s): %s of %s used, %s free%s",
			d.Name, d.UUID, gib(d.UsedBytes), gib(d.TotalBytes), gib(d.FreeBytes), extra)
	}
	if r.Driver != "" || r.CUDA != "" {
		line("driver", "%s (CUDA %s)", orUnknown(r.Driver), orUnknown(r.CUDA))
	}
	for _, p := range r.Foreign {
		line("GPU user", "GPU %d: pid %d %s, %s", p.Device, p.PID, orUnknown(p.Name), gib(p.UsedBytes))
	}

	for _, e := range r.Env {
		state := "ok"
		switch {
		case !e.Set:
			state = "not set"
		case !e.Exists:
			state = "missing"
		case !e.Writable:
			state = "read-only"
		}
		free := ""
		if f, ok := r.DiskFree[e.Value]; ok && e.Value != "" {
			free = fmt.Sprintf(", %s free", gib(f))
		}
		line(e.Name, "%s (%s%s)", orUnknown(e.Value), state, free)
	}

	t := r.Trainer
	switch {
	case !t.Found:
		line("trainer", "%s: not found", t.Cmd)
	case t.Python == "":
		line("trainer", "%s -> %s", t.Cmd, t.Path)
	default:
		line("trainer", "%s -> %s (python %s)", t.Cmd, t.Path, t.Python)
	}
	if len(t.Versions) > 0 {
		keys := make([]string, 0, len(t.Versions))
		for k := range t.Versions {
			keys = append(keys, k)
		}
		order := append(append([]string(nil), Distributions...), "python")
		slices.SortFunc(keys, func(a, b string) int {
			ia, ib := slices.Index(order, a), slices.Index(order, b)
			if ia < 0 {
				ia = len(order)
			}
			if ib < 0 {
				ib = len(order)
			}
			if ia != ib {
				return ia - ib
			}
			return strings.Compare(a, b)
		})
		parts := make([]string, 0, len(keys))
		for _, k := range keys {
			parts = append(parts, k+" "+t.Versions[k])
		}
		line("versions", "%s", strings.Join(parts, ", "))
	}

	line("workers", "%d data-loading workers (nnUNet_n_proc_DA)", r.NProcDA)
	if r.ShmBytes > 0 {
		line("/dev/shm", "%s (%s free)", gib(r.ShmBytes), gib(r.ShmFree))
	}
	if r.HostRAM > 0 {
		line("host RAM", "%s (%s available)", gib(r.HostRAM), gib(r.HostRAMAvailable))
	}

	if len(r.Problems) > 0 {
		b.WriteString("\nProblems:\n")
		for _, p := range r.Problems {
			fmt.Fprintf(&b, "  - %s\n", p)
		}
	}
	if len(r.Warnings) > 0 {
		b.WriteString("\nWarnings:\n")
		for _, w := range r.Warnings {
			fmt.Fprintf(&b, "  - %s\n", w)
		}
	}
	if r.OK() {
		b.WriteString("\nOK: nothing stops training under nnguard.\n")
	} else {
		fmt.Fprintf(&b, "\nNOT OK: %d problem(s) to fix first.\n", len(r.Problems))
	}
	return b.String()
}

func orUnknown(s string) string {
	if s == "" {
		return "?"
	}
	return s
}
