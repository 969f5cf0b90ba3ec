package config

import (
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

func TestScanKeyLines(t *testing.T) {
	doc := `# comment with [brackets] and a = "b"
top = 1
"quoted key" = 'x'
dotted.key = 2

[global] # trailing comment
lanes = [ 1,
  2, # a comment ] inside an array
  3 ]
log_level = """
multi
line "" ] [
"""
log_format = '''
literal \ '' [
'''
metrics_address = "a \" # not a comment"

[[export]]
name = "a"
inline = { x = 1, y = [2, 3] }

[[ export ]]
name = 'b'
[export.sub]
k = 1

[[export]]
name = "c"
`
	var v map[string]any
	if _, err := toml.Decode(doc, &v); err != nil {
		t.Fatalf("the test document is not TOML: %v", err)
	}
	got := scanKeyLines(doc)
	want := keyLines{
		"top": 2, "quoted key": 3, "dotted.key": 4,
		"global": 6, "global.lanes": 7, "global.log_level": 10, "global.log_format": 14, "global.metrics_address": 17,
		"export[0]": 19, "export[0].name": 20, "export[0].inline": 21,
		"export[1]": 23, "export[1].name": 24, "export[1].sub": 25, "export[1].sub.k": 26,
		"export[2]": 28, "export[2].name": 29,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("lines\n%v\nwant\n%v", got, want)
	}
	for key, line := range map[string]int{
		"export[1].name":     24, // exact
		"export[0].inline.x": 21, // inside an inline table: the line of the table
		"export[2].size":     28, // absent: the export's header
		"export":             19, // the first thing under it
		"nothing":            0,
	} {
		if l := got.lineOf(key); l != line {
			t.Errorf("lineOf(%q) = %d, want %d", key, l, line)
		}
	}
}

var arrayIndex = regexp.MustCompile(`\[[0-9]+\]`)

// FuzzScanKeyLines: the scanner never panics or loops, and every line it gives is in the
// document; for documents the toml parser accepts, every key it reports is one of the
// document's keys.
func FuzzScanKeyLines(f *testing.F) {
	f.Add("[global]\nlanes = 2\n[[export]]\nname = \"x\"\n")
	f.Add("a = \"\"\"\n\\\"\"\"\n\"\"\"\"\"\nb = '''\n'''''\n")
	f.Add("x = [\n{a=1},\n# ]\n]\n[a.'b c'.\"d\"]\n")
	f.Add("[[a]]\n[[a.b]]\n[a.b.c]\n")
	f.Add("\"\\u00e9\" = 1\n'[' = 2\n")
	f.Add("\"\\e\\x41\\U0001F600\" = 0\n") // TOML 1.1 escapes, which strconv.Unquote does not take
	f.Fuzz(func(t *testing.T, doc string) {
		lines := scanKeyLines(doc)
		n := strings.Count(doc, "\n") + 1
		for k, l := range lines {
			if l < 1 || l > n {
				t.Errorf("key %q on line %d of %d", k, l, n)
			}
		}
		_ = lines.lineOf("export[0].name")

		var v map[string]any
		md, err := toml.Decode(doc, &v)
		if err != nil {
			return
		}
		parsed := map[string]bool{}
		for _, k := range md.Keys() {
			parsed[strings.Join(k, ".")] = true
		}
		for k := range lines {
			if plain := arrayIndex.ReplaceAllString(k, ""); !parsed[plain] {
				t.Errorf("scanned key %q (%q) is not in the document; keys %v", k, plain, md.Keys())
			}
		}
	})
}
