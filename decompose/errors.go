package decompose

import (
	"errors"
	"strconv"
	"strings"
)

// Sentinel errors. Every error returned by this package wraps one or more of
// them, so callers can classify failures with errors.Is.
var (
	// ErrInfoFile reports an information file that is missing, unreadable or
	// not a regular file.
	ErrInfoFile = errors.New("decomposition information file not readable")

	// ErrInvalidInfo reports information that does not follow the AMCT
	// format: invalid JSON or UTF-8, wrong JSON types, missing or unknown
	// keys, data after the array, or values out of range.
	ErrInvalidInfo = errors.New("invalid decomposition information")

	// ErrUnknownMode reports a mode other than FCFK, FCSK, SCFK and SCSK.
	ErrUnknownMode = errors.New("unknown decomposition mode")

	// ErrInconsistentShapes reports weight shapes that disagree with the
	// layer's channels, its kernel size or the mode.
	ErrInconsistentShapes = errors.New("inconsistent weight shapes")

	// ErrUnsupportedGroups reports a layer with groups other than 1. AMCT never
	// writes such entries and the geometry of their new layers is undefined.
	ErrUnsupportedGroups = errors.New("groups other than 1 not supported")

	// ErrDuplicateLayer reports two entries that name the same layer.
	ErrDuplicateLayer = errors.New("duplicate layer")

	// ErrLayerNotFound reports an entry whose layer is not in the model.
	ErrLayerNotFound = errors.New("layer not found")

	// ErrNotConv2d reports an entry whose layer is not a Conv2d.
	ErrNotConv2d = errors.New("layer is not a Conv2d")

	// ErrAttributeMismatch reports a layer whose channels, kernel size,
	// stride, dilation or groups differ from its entry.
	ErrAttributeMismatch = errors.New("layer attributes differ from the information file")
)

// infoError is a problem at one place of an information file or entry. Its
// message is "source: entry N (layer): field: detail", leaving out the parts
// that are unknown, and it unwraps to the sentinels in kinds.
type infoError struct {
	source  string
	entry   int // index in the file, or -1 when the error concerns no entry or an Entry on its own
	layer   string
	hasName bool // whether layer is known, because "" is a valid layer name
	field   string
	detail  string
	kinds   []error
}

func (e *infoError) Error() string {
	var b strings.Builder
	if e.source != "" {
		b.WriteString(e.source)
		b.WriteString(": ")
	}
	switch {
	case e.entry >= 0:
		b.WriteString("entry ")
		b.WriteString(strconv.Itoa(e.entry))
		if e.hasName {
			b.WriteString(" (")
			b.WriteString(displayName(e.layer))
			b.WriteString(")")
		}
		b.WriteString(": ")
	case e.hasName:
		b.WriteString("layer ")
		b.WriteString(displayName(e.layer))
		b.WriteString(": ")
	}
	if e.field != "" {
		b.WriteString(e.field)
		b.WriteString(": ")
	}
	b.WriteString(e.detail)
	return b.String()
}

func (e *infoError) Unwrap() []error {
	return e.kinds
}

// displayName returns a layer name as it appears in messages: dotted module
// paths as they are, anything else (the empty root name included) quoted.
func displayName(name string) string {
	if name == "" {
		return strconv.Quote(name)
	}
	for _, r := range name {
		plain := r == '.' || r == '_' || r == '-' ||
			(r >= '0' && r <= '9') || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z')
		if !plain {
			return strconv.Quote(name)
		}
	}
	return name
}
