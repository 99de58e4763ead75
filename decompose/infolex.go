package decompose

import (
	"unicode/utf16"
	"unicode/utf8"
)

// scanInfo parses an information file like ParseInfo, with a hand-written
// scanner in place of encoding/json's token stream. On AMCT's resnet50 file,
// BenchmarkParseInfo measured 255 µs with the token stream and 14 µs with the
// scanner, on a 2-CPU AMD EPYC virtual machine.
//
// scanInfo accepts the inputs that decodeInfo accepts and returns the same
// Info for them, which the tests in infolex_test.go compare. For any other
// input it returns false without a reason, and ParseInfo calls decodeInfo to
// build the error. So the messages, and the *json.SyntaxError that syntax
// errors wrap, stay those of encoding/json.
func scanInfo(data []byte) (*Info, bool) {
	if !utf8.Valid(data) {
		return nil, false
	}
	s := &infoScanner{data: data}
	if !s.consume('[') {
		return nil, false
	}

	info := &Info{Entries: []Entry{}}
	if !s.consume(']') {
		names := make(map[string]struct{})
		for {
			if len(info.Entries) == maxEntries {
				return nil, false
			}
			var entry Entry
			if !s.scanEntry(&entry) {
				return nil, false
			}
			if _, duplicate := names[entry.Layer.Name]; duplicate {
				return nil, false
			}
			names[entry.Layer.Name] = struct{}{}
			info.Entries = append(info.Entries, entry)

			if s.consume(']') {
				break
			}
			if !s.consume(',') {
				return nil, false
			}
		}
	}

	s.skipSpace()
	if s.offset != len(data) {
		return nil, false
	}
	return info, true
}

// infoScanner reads JSON text from offset on. Its methods skip white space
// before a token, advance past what they accept and return false on
// anything else, leaving offset wherever they stopped.
type infoScanner struct {
	data   []byte
	offset int
}

func (s *infoScanner) skipSpace() {
	for s.offset < len(s.data) {
		switch s.data[s.offset] {
		case ' ', '\t', '\r', '\n':
			s.offset++
		default:
			return
		}
	}
}

// consume skips white space and then the byte c, if c comes next.
func (s *infoScanner) consume(c byte) bool {
	s.skipSpace()
	if s.offset < len(s.data) && s.data[s.offset] == c {
		s.offset++
		return true
	}
	return false
}

func (s *infoScanner) scanEntry(entry *Entry) bool {
	return s.scanObject(entryKeys, func(key string) bool {
		switch key {
		case "ori_layer_info":
			return s.scanLayerInfo(&entry.Layer)
		case "mode":
			return s.scanMode(&entry.Mode)
		default:
			return s.scanObject(nodesKeys, func(key string) bool {
				shape := &entry.FirstShape
				if key == "last" {
					shape = &entry.LastShape
				}
				return s.scanObject(nodeKeys, func(string) bool {
					return s.scanDims(shape[:])
				})
			})
		}
	})
}

// scanObject reads a JSON object, calling scan for each key in file order to
// read its value. It returns false unless each of keys occurs exactly once
// and no other key occurs.
func (s *infoScanner) scanObject(keys []string, scan func(key string) bool) bool {
	if !s.consume('{') || s.consume('}') {
		return false
	}
	var seen uint64 // bit i is set once keys[i] was read
	for {
		text, ok := s.scanString()
		if !ok {
			return false
		}
		index := keyIndex(keys, text)
		if index < 0 || seen&(1<<index) != 0 {
			return false
		}
		seen |= 1 << index
		if !s.consume(':') || !scan(keys[index]) {
			return false
		}

		if s.consume('}') {
			return seen == 1<<len(keys)-1
		}
		if !s.consume(',') {
			return false
		}
	}
}

// keyIndex returns the index of text in keys, or -1.
func keyIndex(keys []string, text []byte) int {
	for i, key := range keys {
		if string(text) == key {
			return i
		}
	}
	return -1
}

func (s *infoScanner) scanLayerInfo(layer *LayerInfo) bool {
	return s.scanObject(layerKeys, func(key string) bool {
		switch key {
		case "name":
			text, ok := s.scanString()
			layer.Name = string(text)
			return ok
		case "in_channels":
			return s.scanDim(&layer.InChannels)
		case "out_channels":
			return s.scanDim(&layer.OutChannels)
		case "kernel_size":
			return s.scanDims(layer.KernelSize[:])
		case "stride":
			return s.scanDims(layer.Stride[:])
		case "dilation":
			return s.scanDims(layer.Dilation[:])
		default:
			return s.scanDim(&layer.Groups)
		}
	})
}

func (s *infoScanner) scanMode(mode *Mode) bool {
	text, ok := s.scanString()
	if !ok {
		return false
	}
	*mode = Mode(text)
	return mode.isKnown()
}

// scanDims reads a JSON array of exactly len(dst) integers in 1..maxDim.
func (s *infoScanner) scanDims(dst []int) bool {
	if !s.consume('[') {
		return false
	}
	for i := range dst {
		if i > 0 && !s.consume(',') {
			return false
		}
		if !s.scanDim(&dst[i]) {
			return false
		}
	}
	return s.consume(']')
}

// scanDim reads a JSON number written as a plain integer in 1..maxDim, the
// only numbers that parseDim accepts. Every other number is invalid JSON or
// is rejected by parseDim: a sign, a leading zero, a fraction, an exponent or
// a value above maxDim.
func (s *infoScanner) scanDim(dst *int) bool {
	s.skipSpace()
	start := s.offset
	value := 0
	for s.offset < len(s.data) && '0' <= s.data[s.offset] && s.data[s.offset] <= '9' {
		value = value*10 + int(s.data[s.offset]-'0')
		if value > maxDim {
			return false
		}
		s.offset++
	}
	if s.offset == start || s.data[start] == '0' {
		return false
	}
	if s.offset < len(s.data) {
		switch s.data[s.offset] {
		case '.', 'e', 'E':
			return false
		}
	}
	*dst = value
	return true
}

// scanString reads a JSON string and returns its decoded text, which shares
// the input's memory when the string has no escapes. It rejects a string
// with an unpaired UTF-16 surrogate escape, as readString does. The input
// must be valid UTF-8, which scanInfo checks first.
func (s *infoScanner) scanString() ([]byte, bool) {
	if !s.consume('"') {
		return nil, false
	}
	start := s.offset
	for s.offset < len(s.data) {
		switch c := s.data[s.offset]; {
		case c == '"':
			s.offset++
			return s.data[start : s.offset-1], true
		case c == '\\':
			return s.scanEscapedString(start)
		case c < 0x20:
			return nil, false
		}
		s.offset++
	}
	return nil, false
}

// scanEscapedString continues scanString at the first backslash of the
// string whose text starts at start, decoding into a new buffer.
func (s *infoScanner) scanEscapedString(start int) ([]byte, bool) {
	text := make([]byte, s.offset-start, s.offset-start+16)
	copy(text, s.data[start:s.offset])
	for s.offset < len(s.data) {
		c := s.data[s.offset]
		switch {
		case c == '"':
			s.offset++
			return text, true
		case c < 0x20:
			return nil, false
		case c != '\\':
			text = append(text, c)
			s.offset++
			continue
		}

		if s.offset+1 >= len(s.data) {
			return nil, false
		}
		escape := s.data[s.offset+1]
		s.offset += 2
		switch escape {
		case '"', '\\', '/':
			text = append(text, escape)
		case 'b':
			text = append(text, '\b')
		case 'f':
			text = append(text, '\f')
		case 'n':
			text = append(text, '\n')
		case 'r':
			text = append(text, '\r')
		case 't':
			text = append(text, '\t')
		case 'u':
			r, ok := s.scanUnicodeEscape()
			if !ok {
				return nil, false
			}
			text = utf8.AppendRune(text, r)
		default:
			return nil, false
		}
	}
	return nil, false
}

// scanUnicodeEscape reads the 4 hex digits after \u, and the low surrogate
// escape that must follow a high surrogate.
func (s *infoScanner) scanUnicodeEscape() (rune, bool) {
	unit, ok := s.scanHex4()
	switch {
	case !ok:
		return 0, false
	case unit < 0xD800 || unit >= 0xE000:
		return unit, true
	case unit >= 0xDC00:
		return 0, false // a low surrogate without a high one
	}

	if s.offset+2 > len(s.data) || s.data[s.offset] != '\\' || s.data[s.offset+1] != 'u' {
		return 0, false
	}
	s.offset += 2
	low, ok := s.scanHex4()
	if !ok || low < 0xDC00 || low >= 0xE000 {
		return 0, false
	}
	return utf16.DecodeRune(unit, low), true
}

func (s *infoScanner) scanHex4() (rune, bool) {
	if s.offset+4 > len(s.data) {
		return 0, false
	}
	var value rune
	for _, c := range s.data[s.offset : s.offset+4] {
		switch {
		case '0' <= c && c <= '9':
			value = value<<4 | rune(c-'0')
		case 'a' <= c && c <= 'f':
			value = value<<4 | rune(c-'a'+10)
		case 'A' <= c && c <= 'F':
			value = value<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	s.offset += 4
	return value, true
}
