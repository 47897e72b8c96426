package nvml

import (
	"context"
	"errors"
	"fmt"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// fatalXids are the Xid codes that mean the GPU (not the training code) failed:
// the attempt's crash is not the trainer's fault and lowering the batch size
// will not help. Sources: NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors).
var fatalXids = map[uint64]string{
	48:  "double-bit ECC error (DBE): uncorrectable memory error",
	62:  "internal micro-controller halt",
	63:  "ECC page retirement / row remapping event: reset the GPU to apply",
	64:  "ECC page retirement / row remapping failure",
	74:  "NVLink error",
	79:  "GPU has fallen off the bus",
	92:  "high single-bit ECC error rate",
	94:  "contained ECC error: the application must restart",
	95:  "uncontained ECC error: the GPU must be reset",
	119: "GSP RPC timeout",
	120: "GSP error",
	140: "unrecovered ECC error",
	154: "GPU recovery action changed: reset or reboot required",
}

// IsFatalXid reports whether Xid code means a GPU fault rather than an
// application error:
//
//	48  double-bit ECC error (DBE)
//	62  internal micro-controller halt
//	63  ECC page retirement / row remapping event (reset to apply)
//	64  ECC page retirement / row remapping failure
//	74  NVLink error
//	79  GPU has fallen off the bus
//	92  high single-bit ECC error rate
//	94  contained ECC error (the application must restart)
//	95  uncontained ECC error (GPU reset required)
//	119 GSP RPC timeout
//	120 GSP error
//	140 unrecovered ECC error
//	154 GPU recovery action changed (reset or reboot required)
//
// Codes such as 13, 31, 43 and 45 (engine exception, memory page fault, stopped
// channel, preemptive cleanup) usually follow from the application itself.
func IsFatalXid(code uint64) bool {
	_, ok := fatalXids[code]
	return ok
}

// XidText describes a fatal Xid code; "" for other codes.
func XidText(code uint64) string { return fatalXids[code] }

// xidWait is how long one EventSet.Wait blocks in NVML; it bounds how long
// Close and context cancellation take to stop the watcher.
const xidWait = 500 * time.Millisecond

// xidRetry is the pause after an unexpected Wait error, so that a broken event
// set does not spin.
const xidRetry = time.Second

type watched struct {
	index  int
	uuid   string
	handle gonvml.Device
}

// WatchXids registers every device that supports it for
// EventTypeXidCriticalError (NVML's name; it delivers every Xid, fatal or
// not) and starts one goroutine that records the events until ctx is done or
// Close is called; Close waits for it. Xids returns what it recorded.
//
// It may be called once. It fails when the event set cannot be made, when a
// registration fails with anything but ERROR_NOT_SUPPORTED, or (wrapping
// ERROR_NOT_SUPPORTED) when no device supports Xid events; Xids then keeps
// returning nil.
func (n *NVML) WatchXids(ctx context.Context) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return ErrClosed
	}
	n.xmu.Lock()
	defer n.xmu.Unlock()
	if n.watching {
		return errors.New("nvml: already watching Xids")
	}
	count, ret := n.lib.DeviceGetCount()
	if ret != gonvml.SUCCESS {
		return nvmlErr("device count", ret)
	}
	set, ret := n.lib.EventSetCreate()
	if ret != gonvml.SUCCESS {
		return nvmlErr("event set", ret)
	}
	var devs []watched
	for i := 0; i < count; i++ {
		h, err := n.device(i)
		if err != nil {
			set.Free()
			return err
		}
		ret := h.RegisterEvents(gonvml.EventTypeXidCriticalError, set)
		if ret == gonvml.ERROR_NOT_SUPPORTED {
			continue
		}
		if ret != gonvml.SUCCESS {
			set.Free()
			return nvmlErr(fmt.Sprintf("device %d: register Xid events", i), ret)
		}
		uuid, ret := h.GetUUID()
		if ret != gonvml.SUCCESS {
			uuid = ""
		}
		devs = append(devs, watched{index: i, uuid: uuid, handle: h})
	}
	if len(devs) == 0 {
		set.Free()
		return fmt.Errorf("nvml: no device reports Xid events: %w", gonvml.ERROR_NOT_SUPPORTED)
	}
	ctx, cancel := context.WithCancel(ctx)
	n.watching = true
	n.xids = []Xid{}
	n.cancel = cancel
	n.done = make(chan struct{})
	go n.watchXids(ctx, set, devs, n.done)
	return nil
}

func (n *NVML) watchXids(ctx context.Context, set gonvml.EventSet, devs []watched, done chan<- struct{}) {
	defer close(done)
	defer set.Free()
	for ctx.Err() == nil {
		ev, ret := set.Wait(uint32(xidWait / time.Millisecond))
		switch ret {
		case gonvml.SUCCESS:
		case gonvml.ERROR_TIMEOUT:
			continue
		default:
			t := time.NewTimer(xidRetry)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
			continue
		}
		if ev.EventType&gonvml.EventTypeXidCriticalError == 0 {
			continue
		}
		x := Xid{Device: -1, Code: ev.EventData, Time: n.now()}
		for _, d := range devs {
			if ev.Device != nil && ev.Device == d.handle {
				x.Device, x.UUID = d.index, d.uuid
				break
			}
		}
		if x.Device < 0 && ev.Device != nil {
			if uuid, ret := ev.Device.GetUUID(); ret == gonvml.SUCCESS {
				x.UUID = uuid
				for _, d := range devs {
					if d.uuid == uuid {
						x.Device = d.index
					}
				}
			}
		}
		n.xmu.Lock()
		n.xids = append(n.xids, x)
		if len(n.xids) > maxXids {
			n.xids = append(n.xids[:0], n.xids[len(n.xids)-maxXids:]...)
		}
		n.xmu.Unlock()
	}
}

// stopXids cancels the watcher and waits for it.
func (n *NVML) stopXids() {
	n.xmu.Lock()
	cancel, done := n.cancel, n.done
	n.xmu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// Xids implements Reader.
func (n *NVML) Xids(since time.Time) ([]Xid, error) {
	n.xmu.Lock()
	defer n.xmu.Unlock()
	return xidsSince(n.xids, since), nil
}

// xidsSince copies the events at or after since; nil in, nil out.
func xidsSince(all []Xid, since time.Time) []Xid {
	if all == nil {
		return nil
	}
	out := []Xid{}
	for _, x := range all {
		if !x.Time.Before(since) {
			out = append(out, x)
		}
	}
	return out
}
