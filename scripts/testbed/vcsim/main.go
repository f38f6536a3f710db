// ferry-vcsim: the vSphere simulator of govmomi (Debian's golang-github-vmware-govmomi-dev
// ships the library, not the vcsim command) with a TLS certificate of our choosing.
//
// Prints one JSON line on stdout once it serves: the SDK URL, the login, and how many of
// each managed object the simulator holds (what tests compare discovery against). Stops
// on SIGTERM or SIGINT, removing its temporary datastores.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "PEM certificate (chain) to serve")
	keyFile := flag.String("key", "", "PEM private key of the certificate")
	username := flag.String("username", "administrator@vsphere.local", "the only login accepted")
	password := flag.String("password", "Ferry-vcsim-1!", "its password")
	flag.Parse()

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatalf("creating the inventory: %v", err)
	}
	defer model.Remove()
	// An explicit login: with the default one the simulator accepts any password.
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("loading the certificate: %v", err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	server := model.Service.NewServer()
	defer server.Close()

	count := func(kind string) int { return len(simulator.Map.All(kind)) }
	pass, _ := server.URL.User.Password()
	u := *server.URL
	u.User = nil
	out := map[string]interface{}{
		"url":         u.String(),
		"username":    server.URL.User.Username(),
		"password":    pass,
		"datacenters": count("Datacenter"),
		"clusters":    count("ClusterComputeResource"),
		"hosts":       count("HostSystem"),
		"vms":         count("VirtualMachine"),
		"datastores":  count("Datastore"),
		"networks":    count("Network") + count("DistributedVirtualPortgroup"),
		"portgroups":  count("DistributedVirtualPortgroup"),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		log.Fatal(err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
