package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// fixture is a directory with the files the test configurations point at.
type fixture struct {
	dir      string
	blockDev string // a block device on this host, "" if none
	group    string // the name of a group that exists
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"ok.img", "a.img", "b.img", "plain"} {
		if err := os.WriteFile(filepath.Join(dir, f), make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "a.img"), filepath.Join(dir, "link.img")); err != nil {
		t.Fatal(err)
	}
	// A socket left behind by an earlier run: it is replaced at start, so it is fine.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "stale.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	f := &fixture{dir: dir}
	if ents, err := os.ReadDir("/dev"); err == nil {
		for _, e := range ents {
			if fi, err := os.Stat("/dev/" + e.Name()); err == nil && isBlockDevice(fi) {
				f.blockDev = "/dev/" + e.Name()
				break
			}
		}
	}
	g, err := user.LookupGroupId(fmt.Sprint(os.Getgid()))
	if err != nil {
		t.Fatalf("the current group has no name: %v", err)
	}
	f.group = g.Name
	return f
}

// expand replaces $DIR, $BLOCK and $GROUP in a test configuration.
func (f *fixture) expand(doc string) string {
	return strings.NewReplacer("$DIR", f.dir, "$BLOCK", f.blockDev, "$GROUP", f.group).Replace(doc)
}

// okExport is a valid export, to put next to the one under test.
const okExport = `
[[export]]
name = "ok"
socket_path = "$DIR/ok.sock"
file = "$DIR/ok.img"
`

// markedLine is the line of doc that carries the comment "# <-", where the test expects the
// error.
func markedLine(t *testing.T, doc string) int {
	t.Helper()
	for i, l := range strings.Split(doc, "\n") {
		if strings.HasSuffix(l, "# <-") {
			return i + 1
		}
	}
	t.Fatalf("no line marked with # <- in\n%s", doc)
	return 0
}

func parseErrors(t *testing.T, name, doc string) Errors {
	t.Helper()
	cfg, err := Parse(name, []byte(doc))
	if err == nil {
		t.Fatalf("no error; config %+v", cfg)
	}
	var errs Errors
	if !errors.As(err, &errs) {
		t.Fatalf("error %T %v is not Errors", err, err)
	}
	if cfg != nil {
		t.Errorf("a config came back with the errors")
	}
	return errs
}

// TestErrors has one case for each problem Parse reports. Each document has exactly that one
// problem, on the line marked "# <-" (line 0: no mark, the problem has no line).
func TestErrors(t *testing.T) {
	f := newFixture(t)
	long := strings.Repeat("x", 300)
	tests := []struct {
		name string
		doc  string
		key  string
		msg  string // in the message
	}{
		// The document.
		{"syntax", "[global # <-\nlanes = 2\n", "", "TOML syntax"},
		{"syntax in a value", okExport + "size = 1.2.3 # <-\n", "export.size", "TOML syntax"},
		{"duplicate key", okExport + "name = \"again\" # <-\n", "export.name", "already been defined"},
		{"unknown top-level key", "verbose = true # <-\n" + okExport, "verbose", "unknown key"},
		{"unknown table", "[globl] # <-\nlanes = 2\n" + okExport, "globl", "unknown key"},
		{"global not a table", "global = 1 # <-\n" + okExport, "global", "must be a table ([global]), not an integer"},
		{"export not an array", "[export] # <-\nname = \"x\"\n", "export", "must be an array of tables ([[export]]), not a table"},
		{"export array of numbers", "export = [1, 2] # <-\n", "export", "must be an array of tables"},
		{"no exports", "[global]\nlanes = 2\n", "export", "no [[export]] tables"},

		// [global]
		{"log level", "[global]\nlog_level = \"loud\" # <-\n" + okExport, "global.log_level", `must be debug, info, warn or error, not "loud"`},
		{"log format", "[global]\nlog_format = \"xml\" # <-\n" + okExport, "global.log_format", "must be text or json"},
		{"global lanes zero", "[global]\nlanes = 0 # <-\n" + okExport, "global.lanes", "between 1 and 1024, not 0"},
		{"global lanes too many", "[global]\nlanes = 1025 # <-\n" + okExport, "global.lanes", "between 1 and 1024"},
		{"global lanes string", "[global]\nlanes = \"4\" # <-\n" + okExport, "global.lanes", "must be an integer, not a string"},
		{"global direct not a boolean", "[global]\ndirect = \"yes\" # <-\n" + okExport, "global.direct", "must be true or false, not a string"},
		{"global io engine", "[global]\nio_engine = \"aio\" # <-\n" + okExport, "global.io_engine", `must be lanes or uring, not "aio"`},
		{"global io engine not a string", "[global]\nio_engine = 1 # <-\n" + okExport, "global.io_engine", "must be a string, not an integer"},
		{"global io engine misspelt", "[global]\nio-engine = \"uring\" # <-\n" + okExport, "global.io-engine", "unknown key (did you mean io_engine?)"},
		{"metrics without port", "[global]\nmetrics_address = \"localhost\" # <-\n" + okExport, "global.metrics_address", "not host:port"},
		{"metrics bad port", "[global]\nmetrics_address = \"localhost:http\" # <-\n" + okExport, "global.metrics_address", "bad port"},
		{"metrics port too big", "[global]\nmetrics_address = \":70000\" # <-\n" + okExport, "global.metrics_address", "bad port"},
		{"metrics bad host", "[global]\nmetrics_address = \"[::1:9100\" # <-\n" + okExport, "global.metrics_address", "bad host"},
		{"metrics unix without a path", "[global]\nmetrics_address = \"unix:\" # <-\n" + okExport, "global.metrics_address", "give the socket path after unix:"},
		{"metrics socket not a socket", "[global]\nmetrics_address = \"unix:$DIR/plain\" # <-\n" + okExport, "global.metrics_address", "plain exists and is not a socket"},
		{"metrics socket path too long", "[global]\nmetrics_address = \"unix:/run/" + strings.Repeat("m", 103) + "\" # <-\n" + okExport, "global.metrics_address", "at most 107"},
		{"metrics socket is an export's socket", "[global]\nmetrics_address = \"unix:$DIR/m.sock\"\n[[export]]\nname = \"x\"\nsocket_path = \"m.sock\" # <-\nfile = \"$DIR/a.img\"\n", "export[0].socket_path", "m.sock is also the metrics socket (line 2)"},
		{"unknown global key", "[global]\nLog_Level = \"info\" # <-\n" + okExport, "global.Log_Level", "unknown key (did you mean log_level?)"},

		// Names.
		{"missing name", "[[export]] # <-\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n", "export[0].name", "missing"},
		{"name not a string", okExport + "[[export]]\nname = 7 # <-\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n", "export[1].name", "must be a string, not an integer"},
		{"empty name", "[[export]]\nname = \"\" # <-\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n", "export[0].name", "is empty"},
		{"name with a space", "[[export]]\nname = \"my disk\" # <-\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n", "export[0].name", "use only letters"},
		{"long name", "[[export]]\nname = \"" + strings.Repeat("n", 65) + "\" # <-\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n", "export[0].name", "longer than 64"},
		{"duplicate name", okExport + "\n[[export]]\nname = \"ok\" # <-\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n", "export[1].name", `duplicate export name "ok" (also export[0], line 2)`},

		// Sockets.
		{"no socket", "[[export]] # <-\nname = \"x\"\nfile = \"$DIR/a.img\"\n", "export[0].socket_path", "missing: give socket_path (or fd"},
		{"socket and fd", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfd = 3 # <-\nfile = \"$DIR/a.img\"\n", "export[0].fd", "exclude each other"},
		{"negative fd", "[[export]]\nname = \"x\"\nfd = -1 # <-\nfile = \"$DIR/a.img\"\n", "export[0].fd", "must be at least 0, not -1"},
		{"fd string", "[[export]]\nname = \"x\"\nfd = \"3\" # <-\nfile = \"$DIR/a.img\"\n", "export[0].fd", "must be an integer"},
		{"duplicate fd", "[[export]]\nname = \"x\"\nfd = 3\nfile = \"$DIR/a.img\"\n[[export]]\nname = \"y\"\nfd = 3 # <-\nfile = \"$DIR/b.img\"\n", "export[1].fd", `fd 3 is also export "x"'s (line 1)`},
		{"empty socket path", "[[export]]\nname = \"x\"\nsocket_path = \"\" # <-\nfile = \"$DIR/a.img\"\n", "export[0].socket_path", "is empty"},
		{"socket path too long", "[[export]]\nname = \"x\"\nsocket_path = \"/run/" + strings.Repeat("s", 103) + "\" # <-\nfile = \"$DIR/a.img\"\n", "export[0].socket_path", "at most 107"},
		{"socket path not a socket", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/plain\" # <-\nfile = \"$DIR/a.img\"\n", "export[0].socket_path", "exists and is not a socket"},
		{"socket under a file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/plain/x.sock\" # <-\nfile = \"$DIR/a.img\"\n", "export[0].socket_path", "plain is not a directory"},
		{"duplicate socket", okExport + "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/./ok.sock\" # <-\nfile = \"$DIR/a.img\"\n", "export[1].socket_path", `ok.sock is also export "ok"'s socket (line 4)`},
		{"socket is a backing file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/new.img\"\nsize = \"1G\"\n[[export]]\nname = \"y\"\nsocket_path = \"$DIR/new.img\" # <-\nfile = \"$DIR/a.img\"\n", "export[1].socket_path", `new.img is also export "x"'s file (line 4)`},

		// Backing files.
		{"no file", "[[export]] # <-\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\n", "export[0].file", "missing: give the file"},
		{"file not a string", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = [\"$DIR/a.img\"] # <-\n", "export[0].file", "must be a string, not an array"},
		{"file with NUL", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a\\u0000\" # <-\n", "export[0].file", "NUL"},
		{"missing file without size", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/new.img\" # <-\n", "export[0].file", "new.img does not exist (set size to create it)"},
		{"missing read-only file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/new.img\" # <-\nsize = \"1G\"\nread_only = true\n", "export[0].file", "a read-only export cannot create it"},
		{"file is a directory", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/adir\" # <-\n", "export[0].file", "is a directory"},
		{"file is a character device", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"/dev/null\" # <-\n", "export[0].file", "not a regular file or block device"},
		{"file under a file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/plain/x.img\" # <-\nsize = \"1G\"\n", "export[0].file", "plain is not a directory"},
		{"file name too long", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/" + long + "\" # <-\nsize = \"1G\"\n", "export[0].file", "file name too long"},
		{"same file", okExport + "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/adir/../ok.img\" # <-\n", "export[1].file", `ok.img is also the backing file of export "ok" (line 5)`},
		{"same file through a symlink", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n[[export]]\nname = \"y\"\nsocket_path = \"$DIR/y.sock\"\nfile = \"$DIR/link.img\" # <-\n", "export[1].file", `link.img is also the backing file of export "x" (line 4)`},
		{"same missing file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/new.img\"\nsize = \"1G\"\n[[export]]\nname = \"y\"\nsocket_path = \"$DIR/y.sock\"\nfile = \"new.img\" # <-\nsize = \"1G\"\n", "export[1].file", "two exports on one file"},

		// Sizes.
		{"size syntax", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = \"lots\" # <-\n", "export[0].size", `invalid size "lots"`},
		{"missing file with a refused size", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/new.img\"\nsize = \"1.5G\" # <-\n", "export[0].size", `invalid size "1.5G"`},
		{"size too large", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = \"9999999T\" # <-\n", "export[0].size", "too large"},
		{"size zero", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = 0 # <-\n", "export[0].size", "0 is not a positive multiple of the logical block size, 512 bytes"},
		{"size negative", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = -512 # <-\n", "export[0].size", "not a positive multiple"},
		{"size not a multiple", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = 1000 # <-\n", "export[0].size", "1000 is not a positive multiple of the logical block size, 512 bytes"},
		{"size not a multiple of 4096", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nlogical_block_size = 4096\nsize = \"1k\" # <-\n", "export[0].size", "1k is not a positive multiple of the logical block size, 4096 bytes"},
		{"size float", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = 1.5 # <-\n", "export[0].size", `must be a size like "20G" or an integer number of bytes, not a float`},
		{"resize without size", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nresize = true # <-\n", "export[0].resize", "resize needs size"},
		{"resize read-only", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = \"2M\"\nresize = true # <-\nread_only = true\n", "export[0].resize", "read-only export cannot resize"},
		{"resize a block device", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$BLOCK\"\nsize = \"2M\"\nresize = true # <-\n", "export[0].resize", "resize applies only to regular files"},
		{"resize not a boolean", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsize = \"2M\"\nresize = \"yes\" # <-\n", "export[0].resize", "must be true or false, not a string"},

		// Device settings.
		{"read_only not a boolean", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nread_only = 1 # <-\n", "export[0].read_only", "must be true or false, not an integer"},
		{"num_queues zero", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nnum_queues = 0 # <-\n", "export[0].num_queues", "between 1 and 64, not 0"},
		{"num_queues too many", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nnum_queues = 65 # <-\n", "export[0].num_queues", "between 1 and 64, not 65"},
		{"lanes negative", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nlanes = -1 # <-\n", "export[0].lanes", "between 0 and 1024, not -1"},
		{"lanes too many", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nlanes = 1025 # <-\n", "export[0].lanes", "between 0 and 1024"},
		{"serial too long", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nserial = \"" + strings.Repeat("s", 21) + "\" # <-\n", "export[0].serial", "21 bytes long; a virtio-blk serial has at most 20"},
		{"serial not a string", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nserial = 42 # <-\n", "export[0].serial", "must be a string"},
		{"write cache", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nwrite_cache = \"none\" # <-\n", "export[0].write_cache", `must be writeback or writethrough, not "none"`},
		{"logical block size", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nlogical_block_size = 1024 # <-\n", "export[0].logical_block_size", "must be 512 or 4096, not 1024"},
		{"logical block size string", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nlogical_block_size = \"4k\" # <-\n", "export[0].logical_block_size", "must be an integer, not a string"},
		{"direct not a boolean", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\ndirect = 1 # <-\n", "export[0].direct", "must be true or false, not an integer"},
		{"io engine", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nio_engine = \"io_uring\" # <-\n", "export[0].io_engine", `must be lanes or uring, not "io_uring"`},
		{"io engine empty", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nio_engine = \"\" # <-\n", "export[0].io_engine", `must be lanes or uring, not ""`},
		{"io engine in capitals", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nIO_ENGINE = \"uring\" # <-\n", "export[0].IO_ENGINE", "unknown key (did you mean io_engine?)"},
		{"discard not a boolean", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\ndiscard = \"off\" # <-\n", "export[0].discard", "must be true or false"},
		{"packed_ring not a boolean", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\npacked_ring = 1 # <-\n", "export[0].packed_ring", "must be true or false"},

		// Socket ownership.
		{"unknown owner", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_owner = \"no-such-user-vublk\" # <-\n", "export[0].socket_owner", `no user "no-such-user-vublk" on this host`},
		{"empty owner", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_owner = \"\" # <-\n", "export[0].socket_owner", "is empty"},
		{"unknown group", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_group = \"no-such-group-vublk\" # <-\n", "export[0].socket_group", `no group "no-such-group-vublk" on this host`},
		{"mode as an integer", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_mode = 0o660 # <-\n", "export[0].socket_mode", `must be an octal string like "0660", not an integer`},
		{"mode not octal", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_mode = \"0689\" # <-\n", "export[0].socket_mode", `"0689" is not an octal mode`},
		{"mode empty", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_mode = \"\" # <-\n", "export[0].socket_mode", "is not an octal mode"},
		{"mode too big", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_mode = \"01777\" # <-\n", "export[0].socket_mode", "between 0001 and 0777"},
		{"mode zero", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket_mode = \"0000\" # <-\n", "export[0].socket_mode", "between 0001 and 0777"},
		{"owner with fd", "[[export]]\nname = \"x\"\nfd = 3\nfile = \"$DIR/a.img\"\nsocket_owner = \"root\" # <-\n", "export[0].socket_owner", "applies only to socket_path"},
		{"group with fd", "[[export]]\nname = \"x\"\nfd = 3\nfile = \"$DIR/a.img\"\nsocket_group = \"$GROUP\" # <-\n", "export[0].socket_group", "applies only to socket_path"},
		{"mode with fd", "[[export]]\nname = \"x\"\nfd = 3\nfile = \"$DIR/a.img\"\nsocket_mode = \"0600\" # <-\n", "export[0].socket_mode", "applies only to socket_path"},

		// Write logs.
		{"empty write log", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nwrite_log = \"\" # <-\n", "export[0].write_log", "is empty"},
		{"write log is a directory", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nwrite_log = \"$DIR/adir\" # <-\n", "export[0].write_log", "adir exists and is not a regular file"},
		{"write log under a file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nwrite_log = \"$DIR/plain/w.log\" # <-\n", "export[0].write_log", "plain is not a directory"},
		{"write log is the backing file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nwrite_log = \"a.img\" # <-\n", "export[0].write_log", "a.img is also this export's file"},
		{"write log is another export's file", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n[[export]]\nname = \"y\"\nsocket_path = \"$DIR/y.sock\"\nfile = \"$DIR/b.img\"\nwrite_log = \"$DIR/link.img\" # <-\n", "export[1].write_log", `link.img is also export "x"'s file (line 4)`},
		{"shared write log", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nwrite_log = \"$DIR/w.log\"\n[[export]]\nname = \"y\"\nsocket_path = \"$DIR/y.sock\"\nfile = \"$DIR/b.img\"\nwrite_log = \"$DIR/w.log\" # <-\n", "export[1].write_log", `w.log is also export "x"'s write log (line 5)`},

		// Keys.
		{"unknown export key", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nsocket-path = \"$DIR/y.sock\" # <-\n", "export[0].socket-path", "unknown key (did you mean socket_path?)"},
		{"unknown key in the second export", okExport + "\n[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\nblocksize = 4096 # <-\n", "export[1].blocksize", "unknown key"},
		{"unknown sub-table", "[[export]]\nname = \"x\"\nsocket_path = \"$DIR/x.sock\"\nfile = \"$DIR/a.img\"\n[export.limits] # <-\niops = 100\n", "export[0].limits", "unknown key"},
		// Limits.
		{"iops not an integer", okExport + "iops_total = \"100\" # <-\n", "export[0].iops_total", "must be an integer (I/Os per second), not a string"},
		{"iops zero", okExport + "iops_read = 0 # <-\n", "export[0].iops_read", "must be between 1 and"},
		{"bps bad size", okExport + "bps_total = \"10Q\" # <-\n", "export[0].bps_total", "invalid size"},
		{"bps float", okExport + "bps_write = 1.5 # <-\n", "export[0].bps_write", "must be a byte count"},
		{"burst without average", okExport + "iops_write_max = 100 # <-\n", "export[0].iops_write_max", "needs iops_write"},
		{"burst below average", okExport + "bps_read = \"2M\"\nbps_read_max = \"1M\" # <-\n", "export[0].bps_read_max", "is below bps_read"},
		{"burst length without burst", okExport + "iops_total = 10\niops_total_max_length = 5 # <-\n", "export[0].iops_total_max_length", "needs iops_total_max"},
		{"burst length too long", okExport + "iops_total = 10\niops_total_max = 20\niops_total_max_length = 100000 # <-\n", "export[0].iops_total_max_length", "between 1 and 86400"},
		{"iops size too small", okExport + "iops_size = 100 # <-\n", "export[0].iops_size", "less than a sector"},
		{"limit misspelt", okExport + "iops-total = 10 # <-\n", "export[0].iops-total", "did you mean iops_total?"},
		{"unknown io group", okExport + "io_group = \"t9\" # <-\n", "export[0].io_group", `no [[io_group]] is called "t9"`},
		{"io group and own limits", "[[io_group]]\nname = \"t1\"\niops_total = 5\n" + okExport + "io_group = \"t1\" # <-\niops_read = 3\n", "export[0].io_group", "takes the group's limits"},
		{"io group without name", "[[io_group]] # <-\niops_total = 5\n" + okExport, "io_group[0].name", "missing"},
		{"io group duplicate", "[[io_group]]\nname = \"t1\"\n[[io_group]]\nname = \"t1\" # <-\n" + okExport, "io_group[1].name", `duplicate io_group name "t1" (also io_group[0], line 1)`},
		{"io group unknown key", "[[io_group]]\nname = \"t1\"\niops = 5 # <-\n" + okExport, "io_group[0].iops", "unknown key"},
		{"inline exports", "export = [ # <-\n  {name = \"x\", socket_path = \"$DIR/x.sock\", file = \"$DIR/a.img\", size = 1000},\n]\n", "export[0].size", "not a positive multiple"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if strings.Contains(tt.doc, "$BLOCK") && f.blockDev == "" {
				t.Skip("no block device in /dev")
			}
			doc := f.expand(tt.doc)
			name := filepath.Join(f.dir, "vublk.toml")
			errs := parseErrors(t, name, doc)
			if len(errs) != 1 {
				t.Fatalf("%d errors, want 1:\n%v", len(errs), errs)
			}
			e := errs[0]
			line := 0
			if strings.Contains(doc, "# <-") {
				line = markedLine(t, doc)
			}
			if e.File != name || e.Line != line || e.Key != tt.key {
				t.Errorf("error at %s:%d key %q, want %s:%d key %q: %v", e.File, e.Line, e.Key, name, line, tt.key, e)
			}
			if !strings.Contains(e.Msg, f.expand(tt.msg)) {
				t.Errorf("message %q does not say %q", e.Msg, tt.msg)
			}
			prefix := fmt.Sprintf("%s:%d: ", name, line)
			if line == 0 {
				prefix = name + ": "
			}
			if tt.key != "" {
				prefix += tt.key + ": "
			}
			if !strings.HasPrefix(e.Error(), prefix) {
				t.Errorf("%q does not start with %q", e.Error(), prefix)
			}
		})
	}
}

// TestAllErrorsAtOnce: every problem in a file is reported, in line order, one per line.
func TestAllErrorsAtOnce(t *testing.T) {
	f := newFixture(t)
	doc := f.expand(`[global]
log_format = "xml"
lanes = 0

[[export]]
name = "a"
socket_path = "$DIR/a.sock"
file = "$DIR/a.img"
num_queues = 100
color = "blue"

[[export]]
name = "a"
socket_path = "$DIR/a.sock"
file = "$DIR/missing.img"
size = 1000
serial = "this serial is far too long"

[[export]]
fd = 3
file = "$DIR/link.img"
write_cache = "always"
`)
	errs := parseErrors(t, "multi.toml", doc)
	want := []string{
		`multi.toml:2: global.log_format: must be text or json, not "xml"`,
		`multi.toml:3: global.lanes: must be between 1 and 1024, not 0`,
		`multi.toml:9: export[0].num_queues: must be between 1 and 64, not 100`,
		`multi.toml:10: export[0].color: unknown key`,
		`multi.toml:13: export[1].name: duplicate export name "a" (also export[0], line 5)`,
		`multi.toml:14: export[1].socket_path: ` + f.dir + `/a.sock is also export "a"'s socket (line 7)`,
		`multi.toml:16: export[1].size: 1000 is not a positive multiple of the logical block size, 512 bytes`,
		`multi.toml:17: export[1].serial: "this serial is far too long" is 27 bytes long; a virtio-blk serial has at most 20`,
		`multi.toml:19: export[2].name: missing: every export needs a name`,
		`multi.toml:21: export[2].file: ` + f.dir + `/link.img is also the backing file of export "a" (line 8): two exports on one file would corrupt it`,
		`multi.toml:22: export[2].write_cache: must be writeback or writethrough, not "always"`,
	}
	got := strings.Split(errs.Error(), "\n")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestDefaults(t *testing.T) {
	f := newFixture(t)
	cfg, err := Parse(filepath.Join(f.dir, "vublk.toml"), []byte(`
[[export]]
name = "a-rather-long-export-name"
socket_path = "a.sock"
file = "new.img"
size = "1G"
`))
	if err != nil {
		t.Fatal(err)
	}
	wantGlobal := Global{LogLevel: "info", LogFormat: "text", Lanes: defaultLanes(), IOEngine: IOEngineLanes}
	if cfg.Global != wantGlobal {
		t.Errorf("global %+v, want %+v", cfg.Global, wantGlobal)
	}
	want := Export{
		Name:             "a-rather-long-export-name",
		SocketPath:       filepath.Join(f.dir, "a.sock"),
		FD:               -1,
		File:             filepath.Join(f.dir, "new.img"),
		Size:             1 << 30,
		NumQueues:        16,
		Lanes:            defaultLanes(),
		Serial:           "a-rather-long-export",
		WriteCache:       WriteBack,
		IOEngine:         IOEngineLanes,
		LogicalBlockSize: 512,
		Discard:          true,
		PackedRing:       true,
		SocketUID:        -1,
		SocketGID:        -1,
		Line:             2,
	}
	if len(cfg.Exports) != 1 || cfg.Exports[0] != want {
		t.Errorf("exports %+v\nwant %+v", cfg.Exports, want)
	}
	if !cfg.Exports[0].Writeback() {
		t.Error("the default cache mode is not write-back")
	}
	if _, err := os.Stat(filepath.Join(f.dir, "new.img")); err == nil {
		t.Error("checking the configuration created the backing file")
	}
}

func TestEverySetting(t *testing.T) {
	f := newFixture(t)
	doc := f.expand(`# A comment with [brackets] and key = "value".
[global]
log_level = "debug"
log_format = "json"
lanes = 7
metrics_address = "unix:run/metrics.sock"
direct = true
io_engine = "uring"

[[export]]
name = "db"
socket_path = "$DIR/stale.sock"
file = "$DIR/a.img"
size = 4194304
resize = true
num_queues = 4
lanes = 3
serial = "DB-0001"
write_cache = "writethrough"
direct = false
io_engine = "lanes"
logical_block_size = 4096
discard = false
packed_ring = false
socket_owner = "root"
socket_group = "$GROUP"
socket_mode = "0660"
write_log = "logs/db.log"

[[export]]
name = "base"
fd = 0
file = "$DIR/b.img"
read_only = true
lanes = 0
`)
	cfg, err := Parse(filepath.Join(f.dir, "vublk.toml"), []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if want := (Global{LogLevel: "debug", LogFormat: "json", Lanes: 7, Direct: true, IOEngine: IOEngineURing, MetricsAddress: "unix:" + filepath.Join(f.dir, "run", "metrics.sock")}); cfg.Global != want {
		t.Errorf("global %+v, want %+v", cfg.Global, want)
	}
	gid := os.Getgid()
	want := []Export{{
		Name: "db", SocketPath: filepath.Join(f.dir, "stale.sock"), FD: -1, File: filepath.Join(f.dir, "a.img"),
		Size: 4 << 20, Resize: true, NumQueues: 4, Lanes: 3, Serial: "DB-0001", WriteCache: WriteThrough,
		Direct: false, IOEngine: IOEngineLanes,
		LogicalBlockSize: 4096, SocketOwner: "root", SocketGroup: f.group, SocketUID: 0, SocketGID: gid,
		SocketMode: 0o660, WriteLog: filepath.Join(f.dir, "logs", "db.log"), Line: 10,
	}, {
		// direct and io_engine from [global].
		Name: "base", FD: 0, File: filepath.Join(f.dir, "b.img"), ReadOnly: true, NumQueues: 16, Lanes: 7,
		Serial: "base", WriteCache: WriteBack, Direct: true, IOEngine: IOEngineURing,
		LogicalBlockSize: 512, Discard: true, PackedRing: true, SocketUID: -1, SocketGID: -1, Line: 30,
	}}
	if !reflect.DeepEqual(cfg.Exports, want) {
		t.Errorf("exports\n%+v\nwant\n%+v", cfg.Exports, want)
	}
	if e := cfg.Lookup("base"); e == nil || e.File != want[1].File {
		t.Errorf("Lookup(base) = %+v", e)
	}
	if e := cfg.Lookup("nope"); e != nil {
		t.Errorf("Lookup(nope) = %+v", e)
	}
}

// TestNumericOwner: numeric ids are used as they are, without a passwd entry.
func TestMetricsAddress(t *testing.T) {
	f := newFixture(t)
	for _, addr := range []string{":9100", "127.0.0.1:9321", "[::1]:0", "localhost:65535", "unix:" + f.dir + "/stale.sock"} {
		cfg, err := Parse(filepath.Join(f.dir, "v.toml"), []byte(f.expand("[global]\nmetrics_address = \""+addr+"\"\n"+okExport)))
		if err != nil {
			t.Errorf("%s: %v", addr, err)
		} else if cfg.Global.MetricsAddress != addr {
			t.Errorf("%s became %s", addr, cfg.Global.MetricsAddress)
		}
	}
}

func TestNumericOwner(t *testing.T) {
	f := newFixture(t)
	cfg, err := Parse(filepath.Join(f.dir, "v.toml"), []byte(f.expand(okExport+"socket_owner = \"54321\"\nsocket_group = \"54322\"\nsocket_mode = \"0o600\"\n")))
	if err != nil {
		t.Fatal(err)
	}
	if e := cfg.Exports[0]; e.SocketUID != 54321 || e.SocketGID != 54322 || e.SocketMode != 0o600 {
		t.Errorf("uid %d gid %d mode %v", e.SocketUID, e.SocketGID, e.SocketMode)
	}
}

// TestMissingSocketDirectory: a socket directory that does not exist yet is not a problem; the
// service manager makes /run/vublk when it starts the service.
func TestMissingSocketDirectory(t *testing.T) {
	f := newFixture(t)
	doc := f.expand("[[export]]\nname = \"x\"\nsocket_path = \"$DIR/run/vublk/x.sock\"\nfile = \"$DIR/lib/vublk/x.img\"\nsize = \"1G\"\nwrite_log = \"$DIR/log/x.log\"\n")
	if _, err := Parse(filepath.Join(f.dir, "v.toml"), []byte(doc)); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	f := newFixture(t)
	path := filepath.Join(f.dir, "vublk.toml")
	if err := os.WriteFile(path, []byte(f.expand(okExport)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.File != path || len(cfg.Exports) != 1 {
		t.Errorf("config %+v", cfg)
	}

	missing := filepath.Join(f.dir, "nope.toml")
	_, err = Load(missing)
	var errs Errors
	if !errors.As(err, &errs) || len(errs) != 1 {
		t.Fatalf("error %v", err)
	}
	if want := missing + ": cannot read the configuration: no such file or directory"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	var one *Error
	if !errors.As(err, &one) || one.File != missing {
		t.Errorf("errors.As(*Error) = %v", one)
	}
}

func TestErrorFormat(t *testing.T) {
	for _, tt := range []struct {
		e    Error
		want string
	}{
		{Error{File: "f.toml", Line: 3, Key: "export[0].size", Msg: "bad"}, "f.toml:3: export[0].size: bad"},
		{Error{File: "f.toml", Key: "export", Msg: "none"}, "f.toml: export: none"},
		{Error{File: "f.toml", Line: 1, Msg: "syntax"}, "f.toml:1: syntax"},
	} {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("%q, want %q", got, tt.want)
		}
	}
}

func TestVDUSEExport(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(file, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, body, wantErr string
		bus                 string
	}{
		{"default bus", `vduse = "vd0"`, "", VDUSEBusVirtio},
		{"vhost bus", "vduse = \"vd0\"\nvduse_bus = \"vhost\"", "", VDUSEBusVhost},
		{"bad bus", "vduse = \"vd0\"\nvduse_bus = \"pci\"", `export[0].vduse_bus: must be "virtio" or "vhost"`, ""},
		{"bus without vduse", "socket_path = \"s.sock\"\nvduse_bus = \"vhost\"", "export[0].vduse_bus: applies only to vduse exports", ""},
		{"with socket", "vduse = \"vd0\"\nsocket_path = \"s.sock\"", "export[0].vduse: vduse excludes socket_path and fd", ""},
		{"bad name", `vduse = "a/b"`, "export[0].vduse: \"a/b\": a VDUSE device name is", ""},
		{"control", `vduse = "control"`, "export[0].vduse:", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := "[[export]]\nname = \"d\"\nfile = \"" + file + "\"\n" + tc.body + "\n"
			cfg, err := Parse(filepath.Join(dir, "vublk.toml"), []byte(data))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if e := cfg.Exports[0]; e.VDUSE != "vd0" || e.VDUSEBus != tc.bus || e.SocketPath != "" || e.FD != -1 {
				t.Fatalf("export %+v", e)
			}
		})
	}
	t.Run("duplicate", func(t *testing.T) {
		data := "[[export]]\nname = \"a\"\nfile = \"" + file + "\"\nvduse = \"x\"\n[[export]]\nname = \"b\"\nfile = \"" + file + "-2\"\nsize = \"1M\"\nvduse = \"x\"\n"
		_, err := Parse(filepath.Join(dir, "vublk.toml"), []byte(data))
		if err == nil || !strings.Contains(err.Error(), `VDUSE device "x" is also export "a"'s`) {
			t.Fatalf("err %v", err)
		}
	})
}
