package main

// Guest process operations. vcsim 0.24 registers a GuestProcessManager without methods
// (it runs guests only as docker containers); here every guest is a small fake that knows
// a fixed set of services and answers systemctl about them, which is what Ferry runs in
// guests (stopping services before a final sync).

import (
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type guestConfig struct {
	user, password string
	services       []string
	noTools        map[string]bool // VM names whose tools never run
	logFile        string
}

type guestProcess struct {
	vm       string // VM moref value
	name     string
	pid      int64
	owner    string
	cmdLine  string
	start    time.Time
	end      time.Time
	exitCode int32
}

type guestOps struct {
	cfg *guestConfig

	mu      sync.Mutex
	nextPid int64
	stopped map[string]map[string]bool // VM moref value -> stopped services
	procs   []*guestProcess
}

func newGuestOps(cfg *guestConfig) *guestOps {
	return &guestOps{cfg: cfg, nextPid: 1000, stopped: map[string]map[string]bool{}}
}

// toolsRunning: vcsim reports guest tools as not running on every VM, powered on or not;
// here they run on every powered-on VM not named by --no-tools.
func (g *guestOps) toolsRunning(vm *simulator.VirtualMachine) bool {
	return vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn && !g.cfg.noTools[vm.Name]
}

// syncTools makes every VM's guest tools properties tell what toolsRunning decides, so
// that a client checking guest.toolsRunningStatus before a guest operation sees the truth.
// Runs at start and after calls that may change power states.
func (g *guestOps) syncTools() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		simulator.Map.WithLock(vm, func() {
			if vm.Guest == nil {
				return
			}
			running := g.toolsRunning(vm)
			runningStatus := string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
			status := types.VirtualMachineToolsStatusToolsNotRunning
			switch {
			case running:
				runningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
				status = types.VirtualMachineToolsStatusToolsOk
			case g.cfg.noTools[vm.Name]:
				status = types.VirtualMachineToolsStatusToolsNotInstalled
			}
			// Registry.Update cannot assign a *bool property: set that one directly.
			vm.Guest.GuestOperationsReady = types.NewBool(running)
			if vm.Guest.ToolsRunningStatus == runningStatus && vm.Guest.ToolsStatus == status {
				return
			}
			changes := []types.PropertyChange{
				{Name: "guest.toolsRunningStatus", Val: runningStatus},
				{Name: "guest.toolsStatus", Val: status},
			}
			if vm.Summary.Guest != nil {
				changes = append(changes,
					types.PropertyChange{Name: "summary.guest.toolsRunningStatus", Val: runningStatus},
					types.PropertyChange{Name: "summary.guest.toolsStatus", Val: status})
			}
			simulator.Map.Update(vm, changes)
		})
	}
}

type guestAuth struct {
	Username string `xml:"username"`
	Password string `xml:"password"`
}

type startProgramInGuest struct {
	This moRef     `xml:"_this"`
	Vm   moRef     `xml:"vm"`
	Auth guestAuth `xml:"auth"`
	Spec struct {
		ProgramPath      string `xml:"programPath"`
		Arguments        string `xml:"arguments"`
		WorkingDirectory string `xml:"workingDirectory"`
	} `xml:"spec"`
}

type listProcessesInGuest struct {
	This moRef     `xml:"_this"`
	Vm   moRef     `xml:"vm"`
	Auth guestAuth `xml:"auth"`
	Pids []int64   `xml:"pids"`
}

// prepare checks what vSphere checks before a guest operation; it answers the fault
// itself and returns nil when the operation cannot go on.
func (g *guestOps) prepare(w http.ResponseWriter, ref types.ManagedObjectReference, auth guestAuth) *simulator.VirtualMachine {
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		managedObjectNotFound(w, ref)
		return nil
	}
	var running bool
	simulator.Map.WithLock(vm, func() { running = g.toolsRunning(vm) })
	if !running {
		writeFault(w, "The guest operations agent could not be contacted.", "GuestOperationsUnavailable", "")
		return nil
	}
	if auth.Username != g.cfg.user || auth.Password != g.cfg.password {
		writeFault(w, "Failed to authenticate with the guest operating system using the supplied credentials.", "InvalidGuestLogin", "")
		return nil
	}
	return vm
}

func (g *guestOps) startProgram(w http.ResponseWriter, body []byte) {
	var req startProgramInGuest
	if _, err := decodeMethod(body, &req); err != nil {
		writeFault(w, "A specified parameter was not correct: "+err.Error(), "InvalidRequest", "")
		return
	}
	vm := g.prepare(w, req.Vm.ref(), req.Auth)
	if vm == nil {
		return
	}
	program := strings.TrimSpace(req.Spec.ProgramPath)
	if program == "" {
		writeFault(w, "A specified parameter was not correct: spec.programPath", "InvalidArgument", "<invalidProperty>programPath</invalidProperty>")
		return
	}

	g.mu.Lock()
	exit := g.run(vm.Self.Value, program, req.Spec.Arguments)
	g.nextPid++
	now := time.Now()
	p := &guestProcess{
		vm:       vm.Self.Value,
		name:     path.Base(program),
		pid:      g.nextPid,
		owner:    req.Auth.Username,
		cmdLine:  strings.TrimSpace(`"` + program + `" ` + req.Spec.Arguments),
		start:    now,
		end:      now,
		exitCode: exit,
	}
	g.procs = append(g.procs, p)
	g.mu.Unlock()

	g.log(vm.Name, program, req.Spec.Arguments, exit)
	writeResponse(w, fmt.Sprintf(`<StartProgramInGuestResponse xmlns="urn:vim25"><returnval>%d</returnval></StartProgramInGuestResponse>`, p.pid))
}

// run decides a program's exit code; only systemctl does anything. Called with g.mu held.
func (g *guestOps) run(vm, program, arguments string) int32 {
	if path.Base(program) != "systemctl" {
		return 0
	}
	var verb string
	var units []string
	for _, arg := range strings.Fields(arguments) {
		switch {
		case strings.HasPrefix(arg, "-"):
		case verb == "":
			verb = arg
		default:
			units = append(units, strings.TrimSuffix(arg, ".service"))
		}
	}
	if len(units) == 0 {
		return 0
	}
	for _, unit := range units {
		if !g.hasService(unit) {
			return 5 // systemctl: unit not found
		}
	}
	if g.stopped[vm] == nil {
		g.stopped[vm] = map[string]bool{}
	}
	switch verb {
	case "stop":
		for _, unit := range units {
			g.stopped[vm][unit] = true
		}
	case "start", "restart":
		for _, unit := range units {
			delete(g.stopped[vm], unit)
		}
	case "is-active":
		for _, unit := range units {
			if g.stopped[vm][unit] {
				return 3 // systemctl: inactive
			}
		}
	}
	return 0
}

func (g *guestOps) hasService(name string) bool {
	for _, s := range g.cfg.services {
		if s == name {
			return true
		}
	}
	return false
}

func (g *guestOps) log(vm, program, arguments string, exit int32) {
	if g.cfg.logFile == "" {
		return
	}
	line, _ := json.Marshal(struct {
		VM        string `json:"vm"`
		Program   string `json:"program"`
		Arguments string `json:"arguments"`
		Exit      int32  `json:"exit"`
	}{vm, program, arguments, exit})
	g.mu.Lock()
	defer g.mu.Unlock()
	f, err := os.OpenFile(g.cfg.logFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0644)
	if err != nil {
		log.Printf("guest log: %v", err)
		return
	}
	defer f.Close()
	if _, err := f.Write(append(line, '\n')); err != nil {
		log.Printf("guest log: %v", err)
	}
}

func (g *guestOps) listProcesses(w http.ResponseWriter, body []byte) {
	var req listProcessesInGuest
	if _, err := decodeMethod(body, &req); err != nil {
		writeFault(w, "A specified parameter was not correct: "+err.Error(), "InvalidRequest", "")
		return
	}
	vm := g.prepare(w, req.Vm.ref(), req.Auth)
	if vm == nil {
		return
	}
	want := map[int64]bool{}
	for _, pid := range req.Pids {
		want[pid] = true
	}
	const stamp = "2006-01-02T15:04:05.000000Z"
	var out strings.Builder
	out.WriteString(`<ListProcessesInGuestResponse xmlns="urn:vim25">`)
	g.mu.Lock()
	for _, p := range g.procs {
		if p.vm != vm.Self.Value || (len(want) > 0 && !want[p.pid]) {
			continue
		}
		fmt.Fprintf(&out, `<returnval><name>%s</name><pid>%d</pid><owner>%s</owner><cmdLine>%s</cmdLine><startTime>%s</startTime><endTime>%s</endTime><exitCode>%d</exitCode></returnval>`,
			esc(p.name), p.pid, esc(p.owner), esc(p.cmdLine), p.start.UTC().Format(stamp), p.end.UTC().Format(stamp), p.exitCode)
	}
	g.mu.Unlock()
	out.WriteString(`</ListProcessesInGuestResponse>`)
	writeResponse(w, out.String())
}
