package config

import "slices"

// Changes is what a reload (SIGHUP) has to do to go from one configuration to the next. Exports
// are matched by name; each list holds names, in the order of the file they come from.
type Changes struct {
	Added   []string // only in the new configuration: start them
	Removed []string // only in the old configuration: stop them
	// Resized exports differ only in Size or Resize: resize them live (the guest sees a
	// config change) instead of restarting them.
	Resized []string
	// Changed exports differ in anything else (socket, file, queues, cache mode, direct,
	// io_engine...): restart them with the new settings. A change of Global.Lanes, Direct or
	// IOEngine changes every export that uses it.
	Changed []string
	// Limited exports differ only in their limits or io_group: apply them live, without a
	// restart (the connection stays up).
	Limited  []string
	IOGroups bool // the [[io_group]] tables differ
	Global   bool // the [global] settings differ
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool {
	return len(c.Added) == 0 && len(c.Removed) == 0 && len(c.Resized) == 0 && len(c.Changed) == 0 &&
		len(c.Limited) == 0 && !c.IOGroups && !c.Global
}

// Diff compares two valid configurations. Moving an export within the file (its Line) is not a
// change.
func Diff(old, new *Config) Changes {
	var c Changes
	c.Global = old.Global != new.Global
	c.IOGroups = !slices.EqualFunc(old.IOGroups, new.IOGroups, func(a, b IOGroup) bool {
		return a.Name == b.Name && a.Limits == b.Limits
	})
	for _, n := range new.Exports {
		o := old.Lookup(n.Name)
		if o == nil {
			c.Added = append(c.Added, n.Name)
			continue
		}
		a, b := *o, n
		a.Line, b.Line = 0, 0
		if a == b {
			continue
		}
		limited := a.Limits != b.Limits || a.IOGroup != b.IOGroup
		a.Limits, b.Limits = Limits{}, Limits{}
		a.IOGroup, b.IOGroup = "", ""
		if a == b {
			c.Limited = append(c.Limited, n.Name)
			continue
		}
		a.Size, b.Size = 0, 0
		a.Resize, b.Resize = false, false
		if a == b {
			c.Resized = append(c.Resized, n.Name)
			if limited {
				c.Limited = append(c.Limited, n.Name)
			}
		} else {
			// A restart starts the export with its new limits.
			c.Changed = append(c.Changed, n.Name)
		}
	}
	for _, o := range old.Exports {
		if new.Lookup(o.Name) == nil {
			c.Removed = append(c.Removed, o.Name)
		}
	}
	return c
}
