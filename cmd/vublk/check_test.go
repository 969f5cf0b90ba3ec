package main

import (
	"bytes"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

const exampleConfig = "../../examples/vublk.toml"

// TestCheckExample: the shipped example is valid as it is, on a host without its files (every
// active export has a size, and vublk creates the rest).
func TestCheckExample(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"check", "--config", exampleConfig}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit code %d:\n%s", code, stderr.String())
	}
	if got, want := stdout.String(), exampleConfig+": 3 exports OK\n"; got != want {
		t.Errorf("stdout %q, want %q", got, want)
	}
	if stderr.Len() != 0 {
		t.Errorf("stderr %q", stderr.String())
	}
}

// localExample is the example with its paths moved into dir, the commented-out parts for a
// libvirt host (socket group, read-only golden image) switched on, and this host's group as
// the socket group.
func localExample(t *testing.T, dir string) string {
	t.Helper()
	data, err := os.ReadFile(exampleConfig)
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroupId(fmt.Sprint(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	// The golden export is the last block of the file, commented out line by line.
	i := strings.Index(text, "# [[export]]")
	if i < 0 {
		t.Fatal("the example has no commented-out read-only export")
	}
	text = text[:i] + strings.ReplaceAll(text[i:], "\n# ", "\n")
	text = strings.Replace(text, "# [[export]]", "[[export]]", 1)
	if !strings.Contains(text, `# socket_group = "libvirt-qemu"`) {
		t.Fatal("the example has no commented-out socket group for libvirt")
	}
	text = strings.ReplaceAll(text, `# socket_group = "libvirt-qemu"`, fmt.Sprintf("socket_group = %q", g.Name))
	text = strings.ReplaceAll(text, "/var/lib/vublk", filepath.Join(dir, "lib"))
	text = strings.ReplaceAll(text, "/run/vublk", filepath.Join(dir, "run"))
	return text
}

// TestCheckExampleOnALibvirtHost: with the libvirt parts switched on, the read-only export needs
// its image; once the image is there the four exports are valid.
func TestCheckExampleOnALibvirtHost(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "vublk.toml")
	text := localExample(t, dir)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"check", "--config", conf}, &stdout, &stderr); code != exitUsage {
		t.Fatalf("exit code %d without the golden image; stderr %q", code, stderr.String())
	}
	golden := filepath.Join(dir, "lib", "golden.img")
	line := 1 + strings.Count(text[:strings.Index(text, "file = \""+golden)], "\n")
	want := fmt.Sprintf("%s:%d: export[3].file: %s does not exist, and a read-only export cannot create it\n", conf, line, golden)
	if stderr.String() != want || stdout.Len() != 0 {
		t.Errorf("stderr %q, want %q; stdout %q", stderr.String(), want, stdout.String())
	}

	if err := os.MkdirAll(filepath.Dir(golden), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(golden, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"check", "--config", conf}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit code %d with the golden image:\n%s", code, stderr.String())
	}
	if want := conf + ": 4 exports OK\n"; stdout.String() != want {
		t.Errorf("stdout %q, want %q", stdout.String(), want)
	}
}

// TestCheckExampleDirectAndIOEngine: the example's commented direct and io_engine lines are
// valid once switched on, and a bad value is reported at its line.
func TestCheckExampleDirectAndIOEngine(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "vublk.toml")
	text := localExample(t, dir)
	text = text[:strings.Index(text, "[[export]]\nname = \"golden\"")] // without the read-only export
	if n := strings.Count(text, "# direct = true\n") + strings.Count(text, "# io_engine = \"uring\"\n"); n != 4 {
		t.Fatalf("the example has %d commented direct and io_engine lines, want 4 ([global] and one export)", n)
	}
	text = strings.ReplaceAll(text, "# direct = true\n", "direct = true\n")
	text = strings.ReplaceAll(text, "# io_engine = \"uring\"\n", "io_engine = \"uring\"\n")
	for _, tc := range []struct {
		name, text string
		code       int
		out        string
	}{
		{"switched on", text, 0, conf + ": 3 exports OK\n"},
		{"bad engine", strings.Replace(text, `io_engine = "uring"`, `io_engine = "aio"`, 1), exitUsage, `global.io_engine: must be lanes or uring, not "aio"`},
		{"bad direct", strings.Replace(text, "direct = true", `direct = "yes"`, 1), exitUsage, "global.direct: must be true or false, not a string"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(conf, []byte(tc.text), 0o644); err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			if code := run([]string{"check", "--config", conf}, &stdout, &stderr); code != tc.code {
				t.Fatalf("exit code %d, want %d:\n%s", code, tc.code, stderr.String())
			}
			if got := stdout.String() + stderr.String(); !strings.Contains(got, tc.out) {
				t.Errorf("output %q does not say %q", got, tc.out)
			}
		})
	}
}

// TestCheckReportsEveryProblem: all problems at once, one per line, as file:line: key: message.
func TestCheckReportsEveryProblem(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "bad.toml")
	text := fmt.Sprintf(`[global]
log_level = "chatty"

[[export]]
name = "a"
socket_path = %[1]q
file = %[2]q
size = "1000"

[[export]]
name = "a"
socket_path = %[1]q
file = %[3]q
colour = "red"
`, filepath.Join(dir, "a.sock"), filepath.Join(dir, "a.img"), filepath.Join(dir, "missing.img"))
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"check", "--config", conf}, &stdout, &stderr); code != exitUsage {
		t.Errorf("exit code %d, want %d", code, exitUsage)
	}
	if stdout.Len() != 0 {
		t.Errorf("stdout %q", stdout.String())
	}
	want := []string{
		conf + `:2: global.log_level: must be debug, info, warn or error, not "chatty"`,
		conf + `:8: export[0].size: 1000 is not a positive multiple of the logical block size, 512 bytes`,
		conf + `:11: export[1].name: duplicate export name "a" (also export[0], line 4)`,
		conf + `:12: export[1].socket_path: ` + filepath.Join(dir, "a.sock") + ` is also export "a"'s socket (line 6)`,
		conf + `:13: export[1].file: ` + filepath.Join(dir, "missing.img") + ` does not exist (set size to create it)`,
		conf + `:14: export[1].colour: unknown key`,
	}
	if got := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("stderr:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestCheckUsage(t *testing.T) {
	dir := t.TempDir()
	syntax := filepath.Join(dir, "syntax.toml")
	if err := os.WriteFile(syntax, []byte("[[export]]\nname = \"a\"\nsize = 1G\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "nope.toml")
	for _, tt := range []struct {
		name string
		args []string
		want *regexp.Regexp // stderr, one line
	}{
		{"no config", []string{"check"}, regexp.MustCompile(`^vublk check: --config is required`)},
		{"extra argument", []string{"check", "--config", exampleConfig, "more"}, regexp.MustCompile(`^vublk check: unexpected argument "more"`)},
		{"unknown flag", []string{"check", "--cnofig", exampleConfig}, regexp.MustCompile(`flag provided but not defined: -cnofig`)},
		{"missing file", []string{"check", "--config", missing}, regexp.MustCompile(`^` + regexp.QuoteMeta(missing) + `: cannot read the configuration: no such file or directory$`)},
		{"syntax error", []string{"check", "--config", syntax}, regexp.MustCompile(`^` + regexp.QuoteMeta(syntax) + `:3: export[.a-z]*: TOML syntax: `)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(tt.args, &stdout, &stderr); code != exitUsage {
				t.Errorf("exit code %d, want %d", code, exitUsage)
			}
			msg := strings.TrimSuffix(stderr.String(), "\n")
			if strings.Contains(msg, "\n") || !tt.want.MatchString(msg) {
				t.Errorf("stderr %q, want one line matching %s", stderr.String(), tt.want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q", stdout.String())
			}
		})
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"check", "-h"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "-config") || stderr.Len() != 0 {
		t.Errorf("check -h: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
}
