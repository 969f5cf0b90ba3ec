package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// oddSocketName needs every kind of XML escaping in an attribute.
const oddSocketName = "it's a \"disk\" & <more>\tnamed é.sock"

// libvirtConfig writes a configuration with a plain export, a read-only one, one on an odd
// socket path and one on an inherited fd.
func libvirtConfig(t *testing.T) (conf, dir string) {
	t.Helper()
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ro.img"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	text := fmt.Sprintf(`[[export]]
name = "root"
socket_path = %[1]q
file = "root.img"
size = "1G"
num_queues = 4
serial = "ROOT-1"

[[export]]
name = "ro"
socket_path = "ro.sock"
file = "ro.img"
read_only = true

[[export]]
name = "odd--name-"
socket_path = %[2]q
file = "odd.img"
size = "1M"

[[export]]
name = "inherited"
fd = 3
file = "fd.img"
size = "1M"

[[export]]
name = "ctl"
socket_path = "ctl\u0001.sock"
file = "ctl.img"
size = "1M"
`, filepath.Join(dir, "root.sock"), filepath.Join(dir, oddSocketName))
	conf = filepath.Join(dir, "vublk.toml")
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return conf, dir
}

// diskElement is what the test reads back from the printed <disk>.
type diskElement struct {
	XMLName xml.Name `xml:"disk"`
	Type    string   `xml:"type,attr"`
	Device  string   `xml:"device,attr"`
	Driver  struct {
		Name   string `xml:"name,attr"`
		Type   string `xml:"type,attr"`
		Queues string `xml:"queues,attr"`
	} `xml:"driver"`
	Source struct {
		Type      string `xml:"type,attr"`
		Path      string `xml:"path,attr"`
		Reconnect struct {
			Enabled string `xml:"enabled,attr"`
			Timeout string `xml:"timeout,attr"`
		} `xml:"reconnect"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
		Bus string `xml:"bus,attr"`
	} `xml:"target"`
	Serial   *struct{} `xml:"serial"`
	ReadOnly *struct{} `xml:"readonly"`
}

// domainXML is a minimal KVM domain around a disk, with the shared memory vhost-user needs.
func domainXML(disk string) string {
	return `<domain type='kvm'>
  <name>vublk-test</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
` + disk + `  </devices>
</domain>
`
}

// validateDomain runs libvirt's schema validator on a domain document.
func validateDomain(t *testing.T, domain string) error {
	t.Helper()
	validator, err := exec.LookPath("virt-xml-validate")
	if err != nil {
		t.Fatal("virt-xml-validate is not installed (Debian package libvirt-clients): run make deps")
	}
	file := filepath.Join(t.TempDir(), "domain.xml")
	if err := os.WriteFile(file, []byte(domain), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(validator, file, "domain").CombinedOutput()
	if strings.Contains(string(out), "xmllint: not found") {
		t.Fatal("virt-xml-validate needs xmllint (Debian package libxml2-utils): run make deps")
	}
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

func libvirtXMLRun(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(append([]string{"libvirt-xml"}, args...), &o, &e)
	return o.String(), e.String(), code
}

// TestLibvirtXMLValidates: the printed disk, in a domain, passes libvirt's schema, and says what
// the configuration says, the socket path exactly, however odd.
func TestLibvirtXMLValidates(t *testing.T) {
	conf, dir := libvirtConfig(t)
	tests := []struct {
		export, target, queues string
		wantPath, wantQueues   string
		readOnly               bool
		comment                string
	}{
		{"root", "", "", filepath.Join(dir, "root.sock"), "4", false, `serial "ROOT-1"`},
		{"root", "vdb", "2", filepath.Join(dir, "root.sock"), "2", false, `serial "ROOT-1"`},
		{"ro", "vdc", "", filepath.Join(dir, "ro.sock"), "16", true, `serial "ro" and makes it read-only`},
		{"odd--name-", "vdaa", "1", filepath.Join(dir, oddSocketName), "1", false, "serial (not shown)"},
	}
	for _, tt := range tests {
		t.Run(tt.export+"/"+tt.target, func(t *testing.T) {
			args := []string{"--config", conf, "--export", tt.export}
			if tt.target != "" {
				args = append(args, "--target", tt.target)
			}
			if tt.queues != "" {
				args = append(args, "--queues", tt.queues)
			}
			out, errOut, code := libvirtXMLRun(t, args...)
			if code != 0 || errOut != "" {
				t.Fatalf("exit code %d, stderr %q", code, errOut)
			}
			var d diskElement
			if err := xml.Unmarshal([]byte(out), &d); err != nil {
				t.Fatalf("not XML: %v\n%s", err, out)
			}
			target := tt.target
			if target == "" {
				target = "vda"
			}
			if d.Type != "vhostuser" || d.Device != "disk" || d.Driver.Name != "qemu" || d.Driver.Type != "raw" ||
				d.Driver.Queues != tt.wantQueues || d.Source.Type != "unix" || d.Source.Path != tt.wantPath ||
				d.Source.Reconnect.Enabled != "yes" || d.Source.Reconnect.Timeout != "1" ||
				d.Target.Dev != target || d.Target.Bus != "virtio" {
				t.Errorf("disk %+v\nfrom\n%s", d, out)
			}
			// libvirt refuses both on a vhostuser disk; vublk serves them itself.
			if d.Serial != nil || d.ReadOnly != nil {
				t.Errorf("<serial> or <readonly/> in a vhostuser disk:\n%s", out)
			}
			if !strings.Contains(out, tt.comment) {
				t.Errorf("no %q in the comments:\n%s", tt.comment, out)
			}
			if !strings.Contains(out, "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>") {
				t.Errorf("no note on shared memory:\n%s", out)
			}
			if err := validateDomain(t, domainXML(out)); err != nil {
				t.Errorf("virt-xml-validate refuses the domain: %v\n%s", err, domainXML(out))
			}
		})
	}
}

// TestLibvirtXMLExample: every export of the shipped example gives a valid domain.
func TestLibvirtXMLExample(t *testing.T) {
	for _, name := range []string{"vm1-root", "vm1-data", "scratch"} {
		out, errOut, code := libvirtXMLRun(t, "--config", exampleConfig, "--export", name)
		if code != 0 {
			t.Fatalf("%s: exit code %d: %s", name, code, errOut)
		}
		if !strings.Contains(out, "path='/run/vublk/"+name+".sock'") {
			t.Errorf("%s: socket path not in\n%s", name, out)
		}
		if err := validateDomain(t, domainXML(out)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestDomainValidatorCatchesBadDisks: the validation above can fail. A relative socket path,
// a disk type libvirt does not know, or broken XML are refused.
func TestDomainValidatorCatchesBadDisks(t *testing.T) {
	good := "<disk type='vhostuser' device='disk'>\n<driver name='qemu' type='raw' queues='1'/>\n" +
		"<source type='unix' path='/run/x.sock'><reconnect enabled='yes' timeout='1'/></source>\n" +
		"<target dev='vda' bus='virtio'/>\n</disk>\n"
	if err := validateDomain(t, domainXML(good)); err != nil {
		t.Fatalf("the good disk is refused: %v", err)
	}
	for name, bad := range map[string]string{
		"relative path": strings.Replace(good, "/run/x.sock", "x.sock", 1),
		"unknown type":  strings.Replace(good, "vhostuser", "vhost-user", 1),
		"bad reconnect": strings.Replace(good, "enabled='yes'", "enabled='always'", 1),
		"unescaped":     strings.Replace(good, "/run/x.sock", "/run/it's.sock", 1),
	} {
		if err := validateDomain(t, domainXML(bad)); err == nil {
			t.Errorf("%s: virt-xml-validate accepts\n%s", name, bad)
		}
	}
}

func TestLibvirtXMLErrors(t *testing.T) {
	conf, dir := libvirtConfig(t)
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("[[export]]\nname = \"a\"\nnum_queues = 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		args []string
		want string // in stderr
	}{
		{"no flags", nil, "--config and --export are required"},
		{"no export", []string{"--config", conf}, "--config and --export are required"},
		{"extra argument", []string{"--config", conf, "--export", "root", "vda"}, `unexpected argument "vda"`},
		{"unknown export", []string{"--config", conf, "--export", "nope"}, `no export "nope" in ` + conf + " (it has root, ro, odd--name-, inherited, ctl)"},
		{"inherited fd", []string{"--config", conf, "--export", "inherited"}, "listens on an inherited fd"},
		{"control character", []string{"--config", conf, "--export", "ctl"}, "U+0001, which XML 1.0 cannot carry"},
		{"bad target", []string{"--config", conf, "--export", "root", "--target", "sda"}, `--target "sda" is not a virtio disk name`},
		{"injected target", []string{"--config", conf, "--export", "root", "--target", "vda'/><x a='"}, "is not a virtio disk name"},
		{"too many queues", []string{"--config", conf, "--export", "root", "--queues", "5"}, `--queues 5: export "root" takes 1 to 4`},
		{"negative queues", []string{"--config", conf, "--export", "root", "--queues", "-1"}, "takes 1 to 4"},
		{"invalid config", []string{"--config", bad, "--export", "a"}, bad + ":3: export[0].num_queues: must be between 1 and 64"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, code := libvirtXMLRun(t, tt.args...)
			if code != exitUsage {
				t.Errorf("exit code %d, want %d", code, exitUsage)
			}
			if out != "" {
				t.Errorf("stdout %q", out)
			}
			if !strings.Contains(errOut, tt.want) {
				t.Errorf("stderr %q does not say %q", errOut, tt.want)
			}
		})
	}
}

func TestXMLAttr(t *testing.T) {
	for _, tt := range []struct {
		in, want string
		ok       bool
	}{
		{"/run/vublk/a.sock", "/run/vublk/a.sock", true},
		{`a'b"c&d<e>f`, "a&#39;b&#34;c&amp;d&lt;e&gt;f", true},
		{"tab\tnew\nline\r", "tab&#x9;new&#xA;line&#xD;", true},
		{"é😀", "é😀", true},
		{"bell\a", "", false},
		{"\xff", "", false},
		{"\uFFFE", "", false},
	} {
		got, err := xmlAttr(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("xmlAttr(%q) = %q, %v; want %q (ok %v)", tt.in, got, err, tt.want, tt.ok)
		}
		if err == nil {
			var v struct {
				A string `xml:"a,attr"`
			}
			if err := xml.Unmarshal([]byte("<x a='"+got+"'/>"), &v); err != nil || v.A != tt.in {
				t.Errorf("%q does not read back: %q, %v", got, v.A, err)
			}
		}
	}
}
