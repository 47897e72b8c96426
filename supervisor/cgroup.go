package supervisor

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// oomKillCounter reads how many processes the kernel's OOM killer has killed
// in nnguard's memory cgroup (the trainer runs in the same one): the
// oom_kill line of memory.events (cgroup v2) or memory.oom_control (v1).
// A rise during an attempt is evidence of host_oom even when the dead
// worker printed nothing.
type oomKillCounter struct {
	root     string // "/" in production; a fake tree in tests
	selfPath string // /proc/self/cgroup relative to root
}

func newOOMKillCounter() oomKillCounter {
	return oomKillCounter{root: "/", selfPath: "proc/self/cgroup"}
}

// files returns the candidate counter files, most specific first.
func (c oomKillCounter) files() []string {
	var out []string
	f, err := os.Open(filepath.Join(c.root, c.selfPath))
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controller-list:path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "": // v2
			out = append(out,
				filepath.Join(c.root, "sys/fs/cgroup", parts[2], "memory.events"),
				filepath.Join(c.root, "sys/fs/cgroup/memory.events")) // a namespaced container
		case hasController(parts[1], "memory"): // v1
			out = append(out,
				filepath.Join(c.root, "sys/fs/cgroup/memory", parts[2], "memory.oom_control"),
				filepath.Join(c.root, "sys/fs/cgroup/memory/memory.oom_control"))
		}
	}
	return out
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// Count returns the oom_kill count and whether one could be read.
func (c oomKillCounter) Count() (uint64, bool) {
	for _, p := range c.files() {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
				if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64); err == nil {
					return n, true
				}
			}
		}
	}
	return 0, false
}
