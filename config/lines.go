package config

import (
	"strconv"
	"strings"
)

// keyLines maps the keys of a TOML document to the lines they are written on. Keys are
// written with the index of each array of tables: "global", "global.lanes", "export[1]" (the
// [[export]] header), "export[1].size".
//
// BurntSushi/toml keeps key positions to itself (MetaData has none, and its key names carry no
// array index), so the lines come from this small scanner. It runs only on documents the toml
// parser accepted, and it never fails: a key it cannot place falls back to a parent's line in
// lineOf. Keys inside inline tables and arrays are not recorded; they take the line of the key
// that holds them.
type keyLines map[string]int

// scanKeyLines records the line of every table header and every key = value line of doc.
func scanKeyLines(doc string) keyLines {
	s := &lineScanner{doc: doc, line: 1, lines: keyLines{}, arrays: map[string]int{}}
	s.run()
	return s.lines
}

// lineOf is the line of key, or of the first thing written under it ("[export.x]" for "export"),
// or of its closest parent; 0 if none of them is in the document.
func (kl keyLines) lineOf(key string) int {
	for k := key; k != ""; k = parentKey(k) {
		if l, ok := kl[k]; ok {
			return l
		}
		first := 0
		for kk, l := range kl {
			if strings.HasPrefix(kk, k+".") || strings.HasPrefix(kk, k+"[") {
				if first == 0 || l < first {
					first = l
				}
			}
		}
		if first > 0 {
			return first
		}
	}
	return 0
}

// parentKey strips the last part of key: "export[1].size" → "export[1]" → "export".
func parentKey(key string) string {
	if i := strings.LastIndexAny(key, ".["); i >= 0 {
		return key[:i]
	}
	return ""
}

type lineScanner struct {
	doc    string
	i      int
	line   int
	table  string         // the current table, indexed: "export[1]"
	lines  keyLines       //
	arrays map[string]int // how many [[name]] headers each (unindexed) name has had
}

func (s *lineScanner) run() {
	for s.i < len(s.doc) {
		switch c := s.doc[s.i]; c {
		case '\n':
			s.line++
			s.i++
		case ' ', '\t', '\r':
			s.i++
		case '#':
			s.skipComment()
		case '[':
			s.header()
		default:
			start := s.line
			parts := s.keyParts('=')
			if s.i < len(s.doc) && s.doc[s.i] == '=' {
				s.i++
				s.lines[joinKey(s.table, strings.Join(parts, "."))] = start
				s.skipValue()
			} else {
				s.skipLine() // not TOML we understand; never happens after a successful parse
			}
		}
	}
}

// header reads "[a.b]" or "[[a.b]]".
func (s *lineScanner) header() {
	array := strings.HasPrefix(s.doc[s.i:], "[[")
	if array {
		s.i += 2
	} else {
		s.i++
	}
	parts := s.keyParts(']')
	for n := 0; n < 2 && s.i < len(s.doc) && s.doc[s.i] == ']'; n++ {
		s.i++
	}
	// Index every prefix that is an array of tables: [[export]] then [export.sub] is
	// "export[0].sub".
	var b strings.Builder
	plain := ""
	for j, p := range parts {
		plain = joinKey(plain, p)
		if array && j == len(parts)-1 {
			s.arrays[plain]++
		}
		if b.Len() > 0 {
			b.WriteByte('.')
		}
		b.WriteString(p)
		if n := s.arrays[plain]; n > 0 {
			b.WriteString("[" + strconv.Itoa(n-1) + "]")
		}
	}
	s.table = b.String()
	s.lines[s.table] = s.line
}

// keyParts reads a possibly dotted key up to (not past) end or a newline.
func (s *lineScanner) keyParts(end byte) []string {
	var parts []string
	for s.i < len(s.doc) {
		c := s.doc[s.i]
		switch {
		case c == ' ' || c == '\t' || c == '.':
			s.i++
		case c == end || c == '\n' || c == '#':
			return parts
		case c == '"':
			parts = append(parts, unescape(s.basicString()))
		case c == '\'':
			parts = append(parts, strings.Trim(s.literalString(), "'"))
		default:
			j := s.i
			for j < len(s.doc) && isBareKeyChar(s.doc[j]) {
				j++
			}
			if j == s.i {
				j++ // not a key character: step over it
			}
			parts = append(parts, s.doc[s.i:j])
			s.i = j
		}
	}
	return parts
}

func isBareKeyChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// skipValue steps over a value: strings of all four kinds, arrays and inline tables over
// several lines, and comments inside them. It stops at the newline that ends the value.
func (s *lineScanner) skipValue() {
	depth := 0
	for s.i < len(s.doc) {
		switch c := s.doc[s.i]; c {
		case '\n':
			if depth <= 0 {
				return
			}
			s.line++
			s.i++
		case '#':
			s.skipComment()
		case '"':
			if strings.HasPrefix(s.doc[s.i:], `"""`) {
				s.multiLine(`"""`, true)
			} else {
				s.basicString()
			}
		case '\'':
			if strings.HasPrefix(s.doc[s.i:], "'''") {
				s.multiLine("'''", false)
			} else {
				s.literalString()
			}
		case '[', '{':
			depth++
			s.i++
		case ']', '}':
			depth--
			s.i++
		default:
			s.i++
		}
	}
}

// basicString reads a one-line "..." string with backslash escapes and returns it with its quotes.
func (s *lineScanner) basicString() string {
	start := s.i
	s.i++
	for s.i < len(s.doc) && s.doc[s.i] != '"' && s.doc[s.i] != '\n' {
		if s.doc[s.i] == '\\' {
			s.i++
		}
		s.i++
	}
	if s.i < len(s.doc) && s.doc[s.i] == '"' {
		s.i++
	}
	return s.doc[start:min(s.i, len(s.doc))]
}

// literalString reads a one-line '...' string and returns it with its quotes.
func (s *lineScanner) literalString() string {
	start := s.i
	s.i++
	for s.i < len(s.doc) && s.doc[s.i] != '\'' && s.doc[s.i] != '\n' {
		s.i++
	}
	if s.i < len(s.doc) && s.doc[s.i] == '\'' {
		s.i++
	}
	return s.doc[start:s.i]
}

// multiLine steps over a """...""" or ”'...”' string, counting its lines. Up to two quotes
// right before the closing delimiter belong to the string.
func (s *lineScanner) multiLine(delim string, escapes bool) {
	s.i += len(delim)
	for s.i < len(s.doc) {
		c := s.doc[s.i]
		switch {
		case c == '\n':
			s.line++
			s.i++
		case escapes && c == '\\':
			s.i++
			if s.i < len(s.doc) && s.doc[s.i] == '\n' {
				s.line++
			}
			s.i++
		case strings.HasPrefix(s.doc[s.i:], delim):
			s.i += len(delim)
			for n := 0; n < 2 && s.i < len(s.doc) && s.doc[s.i] == delim[0]; n++ {
				s.i++
			}
			return
		default:
			s.i++
		}
	}
}

func (s *lineScanner) skipComment() {
	for s.i < len(s.doc) && s.doc[s.i] != '\n' {
		s.i++
	}
}

func (s *lineScanner) skipLine() {
	s.skipComment()
}

func joinKey(table, key string) string {
	if table == "" {
		return key
	}
	return table + "." + key
}

// unescape decodes a "..." TOML string, quotes included, that the toml parser accepted.
func unescape(quoted string) string {
	q := strings.TrimSuffix(strings.TrimPrefix(quoted, `"`), `"`)
	var b strings.Builder
	for i := 0; i < len(q); i++ {
		if q[i] != '\\' || i+1 == len(q) {
			b.WriteByte(q[i])
			continue
		}
		i++
		hex := 0
		switch q[i] {
		case 'b':
			b.WriteByte('\b')
		case 't':
			b.WriteByte('\t')
		case 'n':
			b.WriteByte('\n')
		case 'f':
			b.WriteByte('\f')
		case 'r':
			b.WriteByte('\r')
		case 'e':
			b.WriteByte(0x1b)
		case 'x':
			hex = 2
		case 'u':
			hex = 4
		case 'U':
			hex = 8
		default: // \" and \\
			b.WriteByte(q[i])
		}
		if hex > 0 && i+hex < len(q) {
			if r, err := strconv.ParseUint(q[i+1:i+1+hex], 16, 32); err == nil {
				b.WriteRune(rune(r))
				i += hex
			}
		}
	}
	return b.String()
}
