// ferry-vcsim: the vSphere simulator of govmomi (Debian's golang-github-vmware-govmomi-dev
// ships the library, not the vcsim command) with a TLS certificate of our choosing, and a
// front layer that adds what vcsim 0.24 lacks and Ferry relies on: vCenter-like session
// enforcement, changed block tracking (snapshot changeIds and QueryChangedDiskAreas),
// guest process operations, and switches to simulate an unreachable vCenter.
//
// The simulator itself serves plain HTTP on a loopback port; the front server (TLS when
// --cert/--key are given) reverse-proxies every request to it and answers or post-processes
// the SOAP calls listed in proxy.go. Being in the same process, the front layer reads and
// changes the simulator's objects through simulator.Map.
//
// Prints one JSON line on stdout once it serves: the front server's SDK URL, the login, how
// many of each managed object the simulator holds (what tests compare discovery against)
// and the local directory of each datastore. Stops on SIGTERM or SIGINT, removing its
// temporary datastores.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "PEM certificate (chain) to serve (plain HTTP without it)")
	keyFile := flag.String("key", "", "PEM private key of the certificate")
	username := flag.String("username", "administrator@vsphere.local", "the only login accepted")
	password := flag.String("password", "Ferry-vcsim-1!", "its password")
	diskMiB := flag.Int64("disk-mib", 64, "size in MiB of every VM's first virtual disk (a real sparse flat extent)")
	guestUser := flag.String("guest-user", "root", "guest OS user accepted by guest operations")
	guestPassword := flag.String("guest-password", "Ferry-guest-1!", "its password")
	services := flag.String("services", "nginx,postgresql", "comma-separated services every guest runs")
	guestLog := flag.String("guest-log", "", "file to append one JSON line per StartProgramInGuest to")
	noTools := flag.String("no-tools", "", "comma-separated VM names whose guest tools never run")
	flag.Parse()

	if *diskMiB <= 0 {
		log.Fatalf("--disk-mib must be positive")
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatalf("creating the inventory: %v", err)
	}
	// log.Fatalf skips deferred calls: fail removes the temporary datastores first.
	fail := func(format string, args ...interface{}) {
		model.Remove()
		log.Fatalf(format, args...)
	}
	defer model.Remove()

	if err := realizeDisks(*diskMiB); err != nil {
		fail("preparing the virtual disks: %v", err)
	}

	// The simulator only ever talks to the front layer, over loopback. An explicit login:
	// with the default one the simulator accepts any password.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*username, *password)}
	backend := model.Service.NewServer()
	defer backend.Close()

	var tlsConfig *tls.Config
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail("loading the certificate: %v", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail("listening on %s: %v", *listen, err)
	}
	scheme := "http"
	if tlsConfig != nil {
		scheme = "https"
		// No NextProtos: HTTP/1.1 only, since the outage switches hijack connections,
		// which HTTP/2 does not allow.
		ln = tls.NewListener(ln, tlsConfig)
	}

	backendURL := &url.URL{Scheme: "http", Host: backend.URL.Host}
	front := newFront(backendURL, &guestConfig{
		user:     *guestUser,
		password: *guestPassword,
		services: splitList(*services),
		noTools:  toSet(splitList(*noTools)),
		logFile:  *guestLog,
	})
	srv := &http.Server{
		Handler:      front,
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			log.Printf("front server: %v", err)
		}
	}()
	defer srv.Close()

	frontURL := &url.URL{Scheme: scheme, Host: advertisedHost(ln.Addr().(*net.TCPAddr)), Path: "/sdk"}
	pointSimulatorAt(model.Service, backendURL, frontURL)
	front.guest.syncTools()

	count := func(kind string) int { return len(simulator.Map.All(kind)) }
	out := map[string]interface{}{
		"url":             frontURL.String(),
		"username":        *username,
		"password":        *password,
		"datacenters":     count("Datacenter"),
		"clusters":        count("ClusterComputeResource"),
		"hosts":           count("HostSystem"),
		"vms":             count("VirtualMachine"),
		"datastores":      count("Datastore"),
		"networks":        count("Network") + count("DistributedVirtualPortgroup"),
		"portgroups":      count("DistributedVirtualPortgroup"),
		"datastore_paths": datastorePaths(),
		"vm_devices":      vmDevices(),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("%v", err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

// advertisedHost is the host:port clients should use: the listening address, or loopback
// when listening on all addresses.
func advertisedHost(addr *net.TCPAddr) string {
	ip := addr.IP
	if ip == nil || ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
	}
	return net.JoinHostPort(ip.String(), fmt.Sprint(addr.Port))
}

// pointSimulatorAt makes the URLs the simulator hands out (service tickets, the
// vcsim.server.url option, guest file transfer URLs) name the front server rather than
// the loopback port behind it.
func pointSimulatorAt(svc *simulator.Service, backend, front *url.URL) {
	sm := simulator.Map.SessionManager()
	simulator.Map.WithLock(sm, func() { sm.ServiceHostName = front.Host })
	// Listen is also the simulator's Server.URL; only its scheme is read afterwards.
	svc.Listen.Scheme = front.Scheme

	om := simulator.Map.OptionManager()
	simulator.Map.WithLock(om, func() {
		for _, setting := range om.Setting {
			opt := setting.GetOptionValue()
			s, ok := opt.Value.(string)
			if !ok || !strings.Contains(s, backend.Host) {
				continue
			}
			s = strings.Replace(s, backend.Host, front.Host, -1)
			s = strings.Replace(s, backend.Scheme+"://", front.Scheme+"://", 1)
			opt.Value = s
		}
	})
}

func datastorePaths() map[string]string {
	paths := map[string]string{}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		simulator.Map.WithLock(ds, func() {
			paths[ds.Name] = ds.Info.GetDatastoreInfo().Url
		})
	}
	return paths
}

// vmDevices counts each VM's virtual disks and network adapters, as the simulator holds
// them: what discovery must find per VM.
func vmDevices() map[string]map[string]int {
	out := map[string]map[string]int{}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		simulator.Map.WithLock(vm, func() {
			disks, nics := 0, 0
			for _, d := range vm.Config.Hardware.Device {
				switch d.(type) {
				case *types.VirtualDisk:
					disks++
				case types.BaseVirtualEthernetCard:
					nics++
				}
			}
			out[vm.Name] = map[string]int{"disks": disks, "nics": nics}
		})
	}
	return out
}

func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func toSet(items []string) map[string]bool {
	set := map[string]bool{}
	for _, item := range items {
		set[item] = true
	}
	return set
}
