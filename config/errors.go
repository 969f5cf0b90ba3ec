package config

import (
	"sort"
	"strconv"
	"strings"
)

// Error is one problem in a configuration file, located by file, line and key.
type Error struct {
	File string // the configuration file's name as given to Load or Parse
	Line int    // 1-based; 0 when the problem has no single line (e.g. no exports at all)
	Key  string // the TOML key, with the array index of an export: "export[1].socket_path"; may be empty
	Msg  string
}

// Error formats e as "file:line: key: message", leaving out the line when it is 0 and the key
// when it is empty.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in one configuration file, ordered by line. Load and Parse
// return it (as error) when there is at least one problem; it is never empty.
type Errors []*Error

// Error puts one problem on each line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.As find a single *Error.
func (es Errors) Unwrap() []error {
	errs := make([]error, len(es))
	for i, e := range es {
		errs[i] = e
	}
	return errs
}

// sorted orders problems by line, keeping the order they were found in within a line.
// Problems without a line come first: they concern the whole file.
func (es Errors) sorted() Errors {
	sort.SliceStable(es, func(i, j int) bool { return es[i].Line < es[j].Line })
	return es
}
