package main

// The front server: reverse-proxies every request to the simulator, enforces sessions on
// the vim25 SOAP endpoint the way vCenter does (vcsim 0.24 lets RetrieveProperties and
// the like through without one), answers the SOAP calls vcsim lacks, and offers test
// switches under /ferry/.

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

const sessionCookie = "vmware_soap_session"

// Methods vCenter answers without a session.
var sessionless = map[string]bool{
	"RetrieveServiceContent":      true,
	"CurrentTime":                 true,
	"Login":                       true,
	"LoginByToken":                true,
	"LoginExtensionByCertificate": true,
	"LoginExtensionBySubjectName": true,
	"LoginBySSPI":                 true,
	"CloneSession":                true,
}

// Methods that create a session; their successful answer sets the session cookie.
var loginMethods = map[string]bool{
	"Login":                       true,
	"LoginByToken":                true,
	"LoginExtensionByCertificate": true,
	"LoginExtensionBySubjectName": true,
	"LoginBySSPI":                 true,
	"CloneSession":                true,
}

type front struct {
	backend *url.URL
	proxy   *httputil.ReverseProxy
	cbt     *cbtStore
	guest   *guestOps
	writes  *shutdownWrites

	mu       sync.Mutex
	sessions map[string]bool // live session cookies

	outageUntil int64 // UnixNano; every request is dropped until then
	dsFailUntil int64 // UnixNano; /folder/ requests are dropped until then
}

func newFront(backend *url.URL, guest *guestConfig) *front {
	f := &front{
		backend:  backend,
		proxy:    httputil.NewSingleHostReverseProxy(backend),
		cbt:      newCBTStore(),
		writes:   newShutdownWrites(),
		sessions: map[string]bool{},
	}
	f.guest = newGuestOps(guest)
	return f
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/ferry/") {
		f.admin(w, r)
		return
	}
	now := time.Now().UnixNano()
	if now < atomic.LoadInt64(&f.outageUntil) ||
		(strings.HasPrefix(r.URL.Path, "/folder/") && now < atomic.LoadInt64(&f.dsFailUntil)) {
		drop(w)
		return
	}
	if r.Method == http.MethodPost && (r.URL.Path == "/sdk" || r.URL.Path == "/sdk/vimService") {
		f.serveSOAP(w, r)
		return
	}
	f.proxy.ServeHTTP(w, r)
}

// drop closes the connection without answering, as an unreachable vCenter (or a load
// balancer in front of a dead one) would.
func drop(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}

func (f *front) admin(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	until := func() (int64, bool) {
		ms, err := strconv.ParseInt(r.URL.Query().Get("ms"), 10, 64)
		if err != nil || ms < 0 {
			http.Error(w, "ms=<milliseconds> required", http.StatusBadRequest)
			return 0, false
		}
		return time.Now().Add(time.Duration(ms) * time.Millisecond).UnixNano(), true
	}
	switch r.URL.Path {
	case "/ferry/expire-sessions":
		n := f.expireSessions()
		writeJSON(w, map[string]interface{}{"expired": n})
	case "/ferry/outage":
		if t, ok := until(); ok {
			atomic.StoreInt64(&f.outageUntil, t)
			writeJSON(w, map[string]interface{}{"ok": true})
		}
	case "/ferry/datastore-fail":
		if t, ok := until(); ok {
			atomic.StoreInt64(&f.dsFailUntil, t)
			writeJSON(w, map[string]interface{}{"ok": true})
		}
	case "/ferry/shutdown-write":
		offset, err := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		if err != nil || offset < 0 {
			http.Error(w, "offset=<bytes> required", http.StatusBadRequest)
			return
		}
		f.writes.arm(r.URL.Query().Get("vm"), offset)
		writeJSON(w, map[string]interface{}{"ok": true})
	case "/ferry/cbt-off":
		name := r.URL.Query().Get("vm")
		if !f.cbt.switchOff(name) {
			http.Error(w, fmt.Sprintf("no VM named %q", name), http.StatusNotFound)
			return
		}
		writeJSON(w, map[string]interface{}{"vm": name, "cbt": false})
	case "/ferry/reset-cbt":
		name := r.URL.Query().Get("vm")
		n, ok := f.cbt.resetVM(name)
		if !ok {
			http.Error(w, fmt.Sprintf("no VM named %q", name), http.StatusNotFound)
			return
		}
		writeJSON(w, map[string]interface{}{"vm": name, "forgotten": n})
	default:
		http.NotFound(w, r)
	}
}

func writeJSON(w http.ResponseWriter, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// expireSessions ends every live session, in the simulator too (a Logout on its behalf),
// so that a client logging in again with its old cookie is not refused as already logged in.
func (f *front) expireSessions() int {
	f.mu.Lock()
	keys := make([]string, 0, len(f.sessions))
	for k := range f.sessions {
		keys = append(keys, k)
	}
	f.sessions = map[string]bool{}
	f.mu.Unlock()

	for _, key := range keys {
		body := envelope(`<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>`)
		req, err := http.NewRequest(http.MethodPost, f.backend.String()+"/sdk", strings.NewReader(body))
		if err != nil {
			continue
		}
		req.Header.Set("Content-Type", "text/xml; charset=utf-8")
		req.AddCookie(&http.Cookie{Name: sessionCookie, Value: key})
		if res, err := http.DefaultClient.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}
	return len(keys)
}

func (f *front) live(r *http.Request) (string, bool) {
	c, err := r.Cookie(sessionCookie)
	if err != nil {
		return "", false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return c.Value, f.sessions[c.Value]
}

// stripDeadSession removes a session cookie the front layer no longer honours, so the
// simulator does not take the request as part of that session.
func stripDeadSession(r *http.Request) {
	var kept []string
	for _, c := range r.Cookies() {
		if c.Name != sessionCookie {
			kept = append(kept, c.Name+"="+c.Value)
		}
	}
	r.Header.Del("Cookie")
	if len(kept) > 0 {
		r.Header.Set("Cookie", strings.Join(kept, "; "))
	}
}

func (f *front) serveSOAP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))

	method, this := soapMethod(body)
	if method == "" {
		// Not a SOAP call the front layer understands: the simulator answers it.
		f.proxy.ServeHTTP(w, r)
		return
	}
	key, live := f.live(r)
	if !live {
		if !sessionless[method] {
			writeFault(w, "The session is not authenticated.", "NotAuthenticated", "")
			return
		}
		stripDeadSession(r)
	}

	switch method {
	case "CurrentTime":
		// vcsim refuses it without a session; vCenter answers it to anyone.
		writeResponse(w, `<CurrentTimeResponse xmlns="urn:vim25"><returnval>`+
			time.Now().UTC().Format("2006-01-02T15:04:05.000000Z")+`</returnval></CurrentTimeResponse>`)
		return
	case "QueryChangedDiskAreas":
		f.cbt.queryChangedDiskAreas(w, body)
		return
	case "StartProgramInGuest":
		f.guest.startProgram(w, body)
		return
	case "ListProcessesInGuest":
		f.guest.listProcesses(w, body)
		return
	}

	if method == "ShutdownGuest" || method == "PowerOffVM_Task" {
		f.writes.beforePowerChange(this)
	}
	rec := newRecorder()
	f.proxy.ServeHTTP(rec, r)
	ok := rec.status == http.StatusOK

	switch {
	case loginMethods[method] && ok:
		for _, c := range (&http.Response{Header: rec.header}).Cookies() {
			if c.Name == sessionCookie && c.Value != "" {
				f.mu.Lock()
				f.sessions[c.Value] = true
				f.mu.Unlock()
			}
		}
	case method == "Logout" && ok:
		f.mu.Lock()
		delete(f.sessions, key)
		f.mu.Unlock()
	case method == "CreateSnapshot_Task" && ok:
		if task, found := returnval(rec.body.Bytes()); found {
			f.cbt.afterSnapshot(this, task)
		}
	case method == "ReconfigVM_Task" && ok:
		f.cbt.afterReconfigure(this)
	}
	if ok && changesPower(method) {
		f.guest.syncTools()
	}
	rec.copyTo(w)
}

func changesPower(method string) bool {
	for _, prefix := range []string{"PowerOn", "PowerOff", "Reset", "Suspend", "ShutdownGuest",
		"RebootGuest", "StandbyGuest", "CreateVM", "CloneVM", "RegisterVM", "Revert", "InstantClone"} {
		if strings.HasPrefix(method, prefix) {
			return true
		}
	}
	return false
}

// recorder holds the simulator's answer so that the front layer can act on it (register
// a session, assign changeIds) before the client sees it.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func newRecorder() *recorder { return &recorder{header: http.Header{}} }

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.body.Write(b)
}

func (r *recorder) copyTo(w http.ResponseWriter) {
	for k, v := range r.header {
		w.Header()[k] = v
	}
	if r.status == 0 {
		r.status = http.StatusOK
	}
	w.WriteHeader(r.status)
	_, _ = w.Write(r.body.Bytes())
}

// moRef decodes a ManagedObjectReference element, taking its plain "type" attribute and
// ignoring xsi:type, which the standard decoder would not tell apart.
type moRef types.ManagedObjectReference

func (m *moRef) UnmarshalXML(d *xml.Decoder, start xml.StartElement) error {
	for _, a := range start.Attr {
		if a.Name.Local == "type" && (a.Name.Space == "" || a.Name.Space == "urn:vim25") {
			m.Type = a.Value
		}
	}
	var v string
	if err := d.DecodeElement(&v, &start); err != nil {
		return err
	}
	m.Value = strings.TrimSpace(v)
	return nil
}

func (m moRef) ref() types.ManagedObjectReference { return types.ManagedObjectReference(m) }

// soapMethod finds the method element of a SOAP request (the first child of Body) and
// the value of its _this.
func soapMethod(body []byte) (string, types.ManagedObjectReference) {
	var this struct {
		This moRef `xml:"_this"`
	}
	name, err := decodeMethod(body, &this)
	if err != nil {
		return name, types.ManagedObjectReference{}
	}
	return name, this.This.ref()
}

// decodeMethod decodes the method element of a SOAP request into v and returns its name.
func decodeMethod(body []byte, v interface{}) (string, error) {
	d := xml.NewDecoder(bytes.NewReader(body))
	inBody := false
	for {
		tok, err := d.Token()
		if err != nil {
			return "", err
		}
		start, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		if !inBody {
			inBody = start.Name.Local == "Body"
			continue
		}
		return start.Name.Local, d.DecodeElement(v, &start)
	}
}

// returnval is the text of the first returnval element of a SOAP response (a task's
// moref for the *_Task methods).
func returnval(body []byte) (types.ManagedObjectReference, bool) {
	d := xml.NewDecoder(bytes.NewReader(body))
	for {
		tok, err := d.Token()
		if err != nil {
			return types.ManagedObjectReference{}, false
		}
		if start, ok := tok.(xml.StartElement); ok && start.Name.Local == "returnval" {
			var m moRef
			if err := d.DecodeElement(&m, &start); err != nil {
				return types.ManagedObjectReference{}, false
			}
			return m.ref(), true
		}
	}
}

const envelopeHead = `<?xml version="1.0" encoding="UTF-8"?>` + "\n" +
	`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`

const envelopeTail = `</soapenv:Body></soapenv:Envelope>`

func envelope(inner string) string { return envelopeHead + inner + envelopeTail }

// writeResponse answers a SOAP call with inner as the body's content.
func writeResponse(w http.ResponseWriter, inner string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, envelope(inner))
}

// writeFault answers with a vim25 fault: faultstring msg, detail <{kind}Fault> with the
// (already escaped) XML detail inside.
func writeFault(w http.ResponseWriter, msg, kind, detail string) {
	elem := fmt.Sprintf(`<%sFault xmlns="urn:vim25" xsi:type="%s"/>`, kind, kind)
	if detail != "" {
		elem = fmt.Sprintf(`<%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault>`, kind, kind, detail, kind)
	}
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	_, _ = io.WriteString(w, envelope(`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`+
		esc(msg)+`</faultstring><detail>`+elem+`</detail></soapenv:Fault>`))
}

func moRefXML(name string, ref types.ManagedObjectReference) string {
	return fmt.Sprintf(`<%s type="%s">%s</%s>`, name, esc(ref.Type), esc(ref.Value), name)
}

func managedObjectNotFound(w http.ResponseWriter, ref types.ManagedObjectReference) {
	writeFault(w, fmt.Sprintf("The object '%s:%s' has already been deleted or has not been completely created", ref.Type, ref.Value),
		"ManagedObjectNotFound", moRefXML("obj", ref))
}

func esc(s string) string {
	var b bytes.Buffer
	if err := xml.EscapeText(&b, []byte(s)); err != nil {
		log.Printf("escaping %q: %v", s, err)
	}
	return b.String()
}
