package main

import (
	"bytes"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/vublk/vublk/config"
)

// libvirtTarget is the target device names libvirt gives virtio disks.
var libvirtTarget = regexp.MustCompile(`^vd[a-z]{1,3}$`)

// libvirtXML is `vublk libvirt-xml --config FILE --export NAME`: print the <disk> element that
// attaches one export to a libvirt domain.
func libvirtXML(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vublk libvirt-xml", flag.ContinueOnError)
	path := fs.String("config", "", "the configuration file")
	name := fs.String("export", "", "the export to attach")
	target := fs.String("target", "vda", "the guest's device name (<target dev>): vda, vdb, ...")
	queues := fs.Int("queues", 0, "virtqueues QEMU uses (<driver queues>), at most the export's num_queues (default: num_queues)")
	if code, ok := parseFlags(fs, args, stdout, stderr); !ok {
		return code
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "vublk libvirt-xml: "+format+"\n", a...)
		return exitUsage
	}
	switch {
	case fs.NArg() > 0:
		return fail("unexpected argument %q", fs.Arg(0))
	case *path == "" || *name == "":
		return fail("--config and --export are required (usage: vublk libvirt-xml --config FILE --export NAME)")
	case !libvirtTarget.MatchString(*target):
		return fail("--target %q is not a virtio disk name like vda or vdb", *target)
	}
	cfg, ok := loadConfig(*path, stderr)
	if !ok {
		return exitUsage
	}
	e := cfg.Lookup(*name)
	if e == nil {
		names := make([]string, len(cfg.Exports))
		for i := range cfg.Exports {
			names[i] = cfg.Exports[i].Name
		}
		return fail("no export %q in %s (it has %s)", *name, *path, strings.Join(names, ", "))
	}
	if *queues == 0 {
		*queues = e.NumQueues
	}
	if *queues < 1 || *queues > e.NumQueues {
		return fail("--queues %d: export %q takes 1 to %d (its num_queues)", *queues, e.Name, e.NumQueues)
	}
	out, err := diskXML(e, *target, *queues)
	if err != nil {
		return fail("%v", err)
	}
	fmt.Fprint(stdout, out)
	return 0
}

// diskXML writes the libvirt <disk type='vhostuser'> element of an export (libvirt's
// formatdomain "Hard drives, floppy disks, CDROMs", vhostuser source), in libvirt's own style,
// followed by comments on what the domain needs around it.
//
// libvirt refuses <serial> and <readonly/> on a vhostuser disk (virDomainDiskVhostUserValidate:
// QEMU's vhost-user-blk-pci has neither property): vublk itself gives the guest the serial and
// the read-only flag, so they appear in comments only.
func diskXML(e *config.Export, target string, queues int) (string, error) {
	if e.VDUSE != "" {
		return "", fmt.Errorf("export %q is a VDUSE device (%s) served to this host's kernel; libvirt connects to a socket_path", e.Name, e.VDUSE)
	}
	if e.SocketPath == "" {
		return "", fmt.Errorf("export %q listens on an inherited fd; libvirt connects to a socket_path", e.Name)
	}
	path, err := xmlAttr(e.SocketPath)
	if err != nil {
		return "", fmt.Errorf("export %q: socket_path %w", e.Name, err)
	}
	var b strings.Builder
	b.WriteString("<disk type='vhostuser' device='disk'>\n")
	fmt.Fprintf(&b, "  <driver name='qemu' type='raw' queues='%d'/>\n", queues)
	fmt.Fprintf(&b, "  <source type='unix' path='%s'>\n", path)
	// QEMU reconnects to the socket a second after vublk restarts (a reload, an upgrade).
	b.WriteString("    <reconnect enabled='yes' timeout='1'/>\n")
	b.WriteString("  </source>\n")
	fmt.Fprintf(&b, "  <target dev='%s' bus='virtio'/>\n", target)
	b.WriteString("</disk>\n")

	b.WriteString("<!-- vublk gives the guest this disk's serial")
	if e.Serial != "" {
		b.WriteString(" " + xmlCommentSafe(e.Serial))
	}
	if e.ReadOnly {
		b.WriteString(" and makes it read-only")
	}
	b.WriteString(": libvirt refuses <serial> and <readonly/> on a vhostuser disk. -->\n")
	b.WriteString("<!-- The domain needs shared memory for vhost-user:\n")
	b.WriteString("     <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking> -->\n")
	return b.String(), nil
}

// xmlAttr escapes s for an attribute value in single or double quotes. Text XML 1.0 cannot
// carry (control characters, invalid UTF-8) is an error, not silently replaced.
func xmlAttr(s string) (string, error) {
	if !utf8.ValidString(s) {
		return "", fmt.Errorf("%q is not valid UTF-8, which XML cannot carry", s)
	}
	for _, r := range s {
		if !isXMLChar(r) {
			return "", fmt.Errorf("%q has the character %U, which XML 1.0 cannot carry", s, r)
		}
	}
	var b bytes.Buffer
	// EscapeText writes ' " & < > and tab, newline, carriage return as character references,
	// so that attribute value normalization keeps them.
	if err := xml.EscapeText(&b, []byte(s)); err != nil {
		return "", err
	}
	return b.String(), nil
}

// isXMLChar is XML 1.0's Char production (section 2.2).
func isXMLChar(r rune) bool {
	return r == 0x09 || r == 0x0A || r == 0x0D ||
		r >= 0x20 && r <= 0xD7FF || r >= 0xE000 && r <= 0xFFFD || r >= 0x10000 && r <= 0x10FFFF
}

// xmlCommentSafe quotes s for an XML comment, which cannot hold "--" or end with "-"; text that
// does not fit is left out.
func xmlCommentSafe(s string) string {
	if strings.Contains(s, "--") || strings.HasSuffix(s, "-") || !utf8.ValidString(s) {
		return "(not shown)"
	}
	for _, r := range s {
		if !isXMLChar(r) || r < 0x20 {
			return "(not shown)"
		}
	}
	return `"` + s + `"`
}
