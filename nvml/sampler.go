package nvml

import (
	"context"
	"errors"
	"sync"
	"time"
)

// RecentSamples is how many samples Sampler.Recent keeps (all devices together).
const RecentSamples = 256

// Sample is one reading of one device.
type Sample struct {
	Time       time.Time `json:"time"`
	Device     int       `json:"device"`
	UsedBytes  uint64    `json:"used_bytes"`
	TotalBytes uint64    `json:"total_bytes"`
	// TreeBytes is the memory of the trainer's process tree on this device.
	TreeBytes uint64 `json:"tree_bytes"`
	// TreeFromDevice says TreeBytes is the device's used figure: the tree
	// is running but none of NVML's PIDs matched it (a PID namespace, e.g. a
	// container), NVML could not say how much each process uses, or the
	// process list could not be read. It then includes other users' memory.
	TreeFromDevice bool `json:"tree_from_device"`
}

// Sampler polls a Reader and keeps the peak of the trainer's memory and the
// latest samples. Reset starts a new attempt. It is safe for concurrent use.
type Sampler struct {
	r        Reader
	interval time.Duration
	devices  map[int]bool // nil = all
	pids     func() []int
	clock    Clock

	mu      sync.Mutex
	peak    Sample
	hasPeak bool
	ring    []Sample // ring buffer of up to RecentSamples
	next    int
	lastErr error
}

// NewSampler samples devices (nil or empty = all) every interval. pids returns
// the trainer's process tree (nil or empty while nothing runs); it may be nil.
// A nil clock is SystemClock.
func NewSampler(r Reader, interval time.Duration, devices []int, pids func() []int, clock Clock) *Sampler {
	if clock == nil {
		clock = SystemClock
	}
	if pids == nil {
		pids = func() []int { return nil }
	}
	s := &Sampler{r: r, interval: interval, pids: pids, clock: clock}
	if len(devices) > 0 {
		s.devices = make(map[int]bool, len(devices))
		for _, d := range devices {
			s.devices[d] = true
		}
	}
	return s
}

// Run samples at once and then every interval until ctx is done. Read errors
// do not stop it; Err returns the latest.
func (s *Sampler) Run(ctx context.Context) {
	t := s.clock.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.Collect()
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
	}
}

// Collect takes one sample of each watched device now, records it and
// returns it. On error the samples are those that could be taken.
func (s *Sampler) Collect() ([]Sample, error) {
	now := s.clock.Now()
	devs, err := s.r.Devices()
	tree := s.pids()
	inTree := make(map[int]bool, len(tree))
	for _, p := range tree {
		inTree[p] = true
	}
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	out := make([]Sample, 0, len(devs))
	for _, d := range devs {
		if s.devices != nil && !s.devices[d.Index] {
			continue
		}
		smp := Sample{Time: now, Device: d.Index, UsedBytes: d.UsedBytes, TotalBytes: d.TotalBytes}
		if len(tree) > 0 {
			procs, err := s.r.Processes(d.Index)
			if err != nil {
				errs = append(errs, err)
				procs = nil
			}
			var sum uint64
			for _, p := range procs {
				if inTree[p.PID] {
					sum += p.UsedBytes
				}
			}
			if sum > 0 {
				smp.TreeBytes = sum
			} else {
				smp.TreeBytes, smp.TreeFromDevice = d.UsedBytes, true
			}
		}
		out = append(out, smp)
	}
	err = errors.Join(errs...)

	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastErr = err
	for _, smp := range out {
		if !s.hasPeak || smp.TreeBytes > s.peak.TreeBytes {
			s.peak, s.hasPeak = smp, true
		}
		if len(s.ring) < RecentSamples {
			s.ring = append(s.ring, smp)
		} else {
			s.ring[s.next] = smp
		}
		s.next = (s.next + 1) % RecentSamples
	}
	return out, err
}

// Peak returns the sample with the highest TreeBytes since the last Reset
// (the earliest of equal ones); ok is false before the first sample.
func (s *Sampler) Peak() (peak Sample, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak, s.hasPeak
}

// Recent returns up to RecentSamples latest samples, oldest first.
func (s *Sampler) Recent() []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Sample, 0, len(s.ring))
	if len(s.ring) == RecentSamples {
		out = append(out, s.ring[s.next:]...)
		return append(out, s.ring[:s.next]...)
	}
	return append(out, s.ring...)
}

// Err returns the error of the latest Collect (nil when it worked).
func (s *Sampler) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// Reset forgets the peak and the recent samples, for a new attempt.
func (s *Sampler) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peak, s.hasPeak = Sample{}, false
	s.ring, s.next = nil, 0
	s.lastErr = nil
}
