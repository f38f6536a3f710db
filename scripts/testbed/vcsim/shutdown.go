package main

// Writes a guest makes while it shuts down. A real guest flushes journals, logs and a
// database's shutdown checkpoint after its services stop; the simulator's VMs run no OS,
// so /ferry/shutdown-write?vm=NAME&offset=N arms one such write: when NAME is next shut
// down or powered off, a 64 KiB record lands at byte N of its first disk, just before
// the power state changes.

import (
	"fmt"
	"log"
	"os"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const shutdownRecord = 64 << 10

type shutdownWrites struct {
	mu    sync.Mutex
	armed map[string]int64 // VM name -> offset
	done  int
}

func newShutdownWrites() *shutdownWrites {
	return &shutdownWrites{armed: map[string]int64{}}
}

func (s *shutdownWrites) arm(vm string, offset int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.armed[vm] = offset
}

// beforePowerChange writes the armed record of the VM ref names, if it is on.
func (s *shutdownWrites) beforePowerChange(ref types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	var name, file string
	var ds *types.ManagedObjectReference
	var on bool
	simulator.Map.WithLock(vm, func() {
		name = vm.Name
		on = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
		if disks := disksOf(vm.Config.Hardware.Device); len(disks) > 0 {
			file, ds = disks[0].fileName, disks[0].ds
		}
	})
	s.mu.Lock()
	offset, armed := s.armed[name]
	delete(s.armed, name)
	s.done++
	n := s.done
	s.mu.Unlock()
	if !armed || !on || file == "" {
		return
	}
	local, err := localPath(file, ds)
	if err != nil {
		log.Printf("shutdown write of %s: %v", name, err)
		return
	}
	rec := make([]byte, shutdownRecord)
	line := []byte(fmt.Sprintf("written by %s while it shut down (#%d)\n", name, n))
	for i := 0; i+len(line) <= len(rec); i += len(line) {
		copy(rec[i:], line)
	}
	f, err := os.OpenFile(extentPath(local), os.O_WRONLY, 0)
	if err != nil {
		log.Printf("shutdown write of %s: %v", name, err)
		return
	}
	defer f.Close()
	if _, err := f.WriteAt(rec, offset); err != nil {
		log.Printf("shutdown write of %s: %v", name, err)
	}
}
