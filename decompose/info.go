package decompose

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// Mode is the decomposition mode of an entry. The letters read: decompose
// the First or Second Channel axis and the First or Second Kernel axis.
type Mode string

// The four modes that AMCT writes.
const (
	// FCFK gives the first layer a (1, kw) kernel and the last layer a (kh, 1) kernel.
	FCFK Mode = "FCFK"
	// FCSK gives the first layer a (kh, 1) kernel and the last layer a (1, kw) kernel.
	FCSK Mode = "FCSK"
	// SCFK gives the first layer a (kh, 1) kernel and the last layer a (1, kw) kernel.
	SCFK Mode = "SCFK"
	// SCSK gives the first layer a (1, kw) kernel and the last layer a (kh, 1) kernel.
	SCSK Mode = "SCSK"
)

// Limits that keep hostile inputs cheap. Real models stay far below them.
const (
	maxEntries = 100000
	maxDim     = 1 << 20
	// maxInfoFileSize bounds what ReadInfo loads into memory. A file of
	// maxEntries entries in AMCT's layout takes about 45 MB, estimated from
	// the 420 to 440 bytes per entry of AMCT's files for torchvision models.
	maxInfoFileSize = 256 << 20
)

// LayerInfo is the geometry of an original Conv2d as AMCT records it under
// "ori_layer_info". Padding is not recorded.
type LayerInfo struct {
	// Name is the dotted module path, or "" when the model itself is the Conv2d.
	Name                    string
	InChannels, OutChannels int
	// KernelSize, Stride and Dilation are (height, width) pairs.
	KernelSize, Stride, Dilation [2]int
	Groups                       int
}

// Entry is one decomposed layer: the original layer, the mode and the weight
// shapes of the two Conv2d layers that replace it.
type Entry struct {
	Layer LayerInfo
	Mode  Mode
	// FirstShape and LastShape are weight shapes [out, in, kh, kw] of the
	// first and the last new layer ("decom_nodes").
	FirstShape, LastShape [4]int
}

// Info is the content of an AMCT decomposition-information file, with the
// entries in file order.
type Info struct {
	Entries []Entry
}

// Keys of the JSON objects, in the order AMCT writes them.
var (
	entryKeys = []string{"ori_layer_info", "mode", "decom_nodes"}
	layerKeys = []string{"name", "in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"}
	nodesKeys = []string{"first", "last"}
	nodeKeys  = []string{"weight_shape"}
)

// ReadInfo reads and parses the information file at path, as ParseInfo does.
// A file that is missing, unreadable or not a regular file gives an error
// that names the path and wraps ErrInfoFile and the cause.
func ReadInfo(path string) (*Info, error) {
	data, err := readRegularFile(path)
	if err != nil {
		return nil, err
	}
	return ParseInfo(data, path)
}

func readRegularFile(path string) ([]byte, error) {
	// Stat before opening, because opening a FIFO blocks until a writer appears.
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInfoFile, err)
	}
	if err := checkRegular(path, info); err != nil {
		return nil, err
	}

	file, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInfoFile, err)
	}
	defer file.Close()

	info, err = file.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInfoFile, err)
	}
	if err := checkRegular(path, info); err != nil {
		return nil, err
	}

	// Sizing the buffer from the file size spares the repeated growing of
	// io.ReadAll. Reading still runs to the end, in case the file grew.
	var buffer bytes.Buffer
	buffer.Grow(int(min(info.Size(), maxInfoFileSize)) + bytes.MinRead)
	if _, err := buffer.ReadFrom(io.LimitReader(file, maxInfoFileSize+1)); err != nil {
		return nil, fmt.Errorf("%w: read %s: %w", ErrInfoFile, path, err)
	}
	data := buffer.Bytes()
	if len(data) > maxInfoFileSize {
		return nil, fmt.Errorf("%w: %s is larger than the maximum of %d bytes", ErrInvalidInfo, path, maxInfoFileSize)
	}
	return data, nil
}

func checkRegular(path string, info fs.FileInfo) error {
	if info.IsDir() {
		return fmt.Errorf("%w: %s is a directory", ErrInfoFile, path)
	}
	if !info.Mode().IsRegular() {
		return fmt.Errorf("%w: %s is not a regular file (mode %s)", ErrInfoFile, path, info.Mode())
	}
	return nil
}

// ParseInfo parses the JSON text of an information file. The source, usually
// the file name, starts every error message unless it is "".
//
// Parsing is strict. The text must be valid UTF-8 holding one JSON array and
// nothing after it but white space. Every element must have exactly the keys
// AMCT writes (in any order, each once), with the JSON types AMCT writes. Every
// integer must lie in 1..2^20, pairs must have 2 and weight shapes 4 elements,
// the mode must be FCFK, FCSK, SCFK or SCSK, no two entries may name the same
// layer, and there may be at most 100000 entries. An empty array is valid.
// Each error names the entry index, the layer when known, and the field path,
// for example "mixed.json: entry 3 (blocks.0): decom_nodes.first.weight_shape:
// want 4 integers, got 3".
//
// All errors wrap ErrInvalidInfo. An unknown mode also wraps ErrUnknownMode,
// and a repeated layer ErrDuplicateLayer. ParseInfo does not check that the
// shapes fit the layer and the mode. Info.Check does.
func ParseInfo(data []byte, source string) (*Info, error) {
	if info, ok := scanInfo(data); ok {
		return info, nil
	}
	return decodeInfo(data, source)
}

// decodeInfo parses like ParseInfo, on encoding/json's token stream.
// ParseInfo calls it only when the faster scanInfo rejects the input, to
// build the error.
func decodeInfo(data []byte, source string) (*Info, error) {
	p := &infoParser{data: data, source: source}
	if offset := invalidUTF8Offset(data); offset >= 0 {
		return nil, p.errorf(-1, "", "invalid UTF-8 at %s", p.position(int64(offset)))
	}

	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	token, err := dec.Token()
	if errors.Is(err, io.EOF) {
		return nil, p.errorf(-1, "", "empty input, want a JSON array of entries")
	}
	if err != nil {
		return nil, p.syntaxError(-1, dec, err)
	}
	if token != json.Delim('[') {
		return nil, p.errorf(-1, "", "want a JSON array of entries, got %s", tokenKind(token))
	}

	info := &Info{Entries: []Entry{}}
	entryOf := make(map[string]int)
	for dec.More() {
		index := len(info.Entries)
		if index == maxEntries {
			return nil, p.errorf(-1, "", "more than the maximum of %d entries", maxEntries)
		}
		entry, err := p.parseEntry(dec, index)
		if err != nil {
			return nil, err
		}
		if first, ok := entryOf[entry.Layer.Name]; ok {
			return nil, &infoError{
				source: source, entry: index, layer: entry.Layer.Name, hasName: true,
				field:  "ori_layer_info.name",
				detail: fmt.Sprintf("duplicate layer, already listed in entry %d", first),
				kinds:  []error{ErrInvalidInfo, ErrDuplicateLayer},
			}
		}
		entryOf[entry.Layer.Name] = index
		info.Entries = append(info.Entries, entry)
	}

	if _, err := dec.Token(); err != nil {
		return nil, p.syntaxError(-1, dec, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, p.errorf(-1, "", "data after the JSON array at %s", p.position(dec.InputOffset()))
	}
	return info, nil
}

type infoParser struct {
	data   []byte
	source string
}

// errorf returns an ErrInvalidInfo error about entry index (-1 for none).
func (p *infoParser) errorf(index int, field, format string, args ...any) *infoError {
	return &infoError{
		source: p.source, entry: index, field: field,
		detail: fmt.Sprintf(format, args...),
		kinds:  []error{ErrInvalidInfo},
	}
}

// syntaxError describes a decoder error, locating it in the input when the
// decoder reports an offset.
func (p *infoParser) syntaxError(index int, dec *json.Decoder, err error) *infoError {
	var syntax *json.SyntaxError
	var e *infoError
	switch {
	case errors.As(err, &syntax):
		e = p.errorf(index, "", "invalid JSON near %s: %v", p.position(syntax.Offset), err)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		e = p.errorf(index, "", "invalid JSON: unexpected end of input")
	default:
		e = p.errorf(index, "", "invalid JSON near %s: %v", p.position(dec.InputOffset()), err)
	}
	e.kinds = append(e.kinds, err)
	return e
}

// position returns "line L, column C" for a byte offset. Lines and columns
// count from 1, and columns count bytes.
func (p *infoParser) position(offset int64) string {
	offset = min(max(offset, 0), int64(len(p.data)))
	before := p.data[:offset]
	line := bytes.Count(before, []byte{'\n'}) + 1
	column := len(before) - bytes.LastIndexByte(before, '\n')
	return fmt.Sprintf("line %d, column %d", line, column)
}

func invalidUTF8Offset(data []byte) int {
	if utf8.Valid(data) {
		return -1
	}
	for offset := 0; offset < len(data); {
		r, size := utf8.DecodeRune(data[offset:])
		if r == utf8.RuneError && size == 1 {
			return offset
		}
		offset += size
	}
	return -1
}

// entryParser reads one entry from the token stream of the whole input, so
// that keys can be checked one by one without copying the entry.
type entryParser struct {
	*infoParser
	dec   *json.Decoder
	index int
	start int64 // input offset where the entry begins, possibly at the comma before it
}

func (p *infoParser) parseEntry(dec *json.Decoder, index int) (Entry, error) {
	ep := &entryParser{infoParser: p, dec: dec, index: index, start: dec.InputOffset()}
	var entry Entry
	err := ep.readObject("", entryKeys, func(key, path string) error {
		switch key {
		case "ori_layer_info":
			return ep.readLayerInfo(path, &entry.Layer)
		case "mode":
			return ep.readMode(path, &entry.Mode)
		default:
			return ep.readObject(path, nodesKeys, func(key, path string) error {
				shape := &entry.FirstShape
				if key == "last" {
					shape = &entry.LastShape
				}
				return ep.readObject(path, nodeKeys, func(_, path string) error {
					return ep.readInts(path, shape[:])
				})
			})
		}
	})
	return entry, err
}

// peekLayerName returns ori_layer_info.name of the entry that starts the
// text, after an optional comma, if the entry is valid JSON and the name is
// there and a string. Errors name the layer with it, even errors met before
// the parser reaches the name.
func peekLayerName(text []byte) (string, bool) {
	text = bytes.TrimLeft(text, " \t\r\n")
	text = bytes.TrimPrefix(text, []byte{','})
	var raw json.RawMessage
	if json.NewDecoder(bytes.NewReader(text)).Decode(&raw) != nil {
		return "", false
	}

	var entry, layer map[string]json.RawMessage
	if json.Unmarshal(raw, &entry) != nil || json.Unmarshal(entry["ori_layer_info"], &layer) != nil {
		return "", false
	}
	var name string
	if json.Unmarshal(layer["name"], &name) != nil {
		return "", false
	}
	return name, true
}

func (ep *entryParser) errorf(field, format string, args ...any) *infoError {
	e := ep.infoParser.errorf(ep.index, field, format, args...)
	e.layer, e.hasName = peekLayerName(ep.data[ep.start:])
	return e
}

func (ep *entryParser) token() (json.Token, error) {
	token, err := ep.dec.Token()
	if err != nil {
		return nil, ep.syntaxError(ep.index, ep.dec, err)
	}
	return token, nil
}

// readObject reads a JSON object that must have exactly the given keys, and
// calls read for each key in file order with the key's field path.
func (ep *entryParser) readObject(path string, keys []string, read func(key, path string) error) error {
	token, err := ep.token()
	if err != nil {
		return err
	}
	if token != json.Delim('{') {
		return ep.errorf(path, "want a JSON object, got %s", tokenKind(token))
	}

	seen := make(map[string]bool, len(keys))
	for ep.dec.More() {
		token, err := ep.token()
		if err != nil {
			return err
		}
		key, _ := token.(string)
		switch {
		case !containsString(keys, key):
			return ep.errorf(path, "unknown key %q, want only %s", key, strings.Join(keys, ", "))
		case seen[key]:
			return ep.errorf(path, "duplicate key %q", key)
		}
		seen[key] = true
		if err := read(key, joinPath(path, key)); err != nil {
			return err
		}
	}
	if _, err := ep.token(); err != nil {
		return err
	}

	for _, key := range keys {
		if !seen[key] {
			return ep.errorf(path, "missing key %q", key)
		}
	}
	return nil
}

func (ep *entryParser) readLayerInfo(path string, layer *LayerInfo) error {
	return ep.readObject(path, layerKeys, func(key, path string) error {
		switch key {
		case "name":
			name, err := ep.readString(path)
			layer.Name = name
			return err
		case "in_channels":
			return ep.readInt(path, &layer.InChannels)
		case "out_channels":
			return ep.readInt(path, &layer.OutChannels)
		case "kernel_size":
			return ep.readInts(path, layer.KernelSize[:])
		case "stride":
			return ep.readInts(path, layer.Stride[:])
		case "dilation":
			return ep.readInts(path, layer.Dilation[:])
		default:
			return ep.readInt(path, &layer.Groups)
		}
	})
}

func (ep *entryParser) readMode(path string, mode *Mode) error {
	text, err := ep.readString(path)
	if err != nil {
		return err
	}
	*mode = Mode(text)
	if !mode.isKnown() {
		e := ep.errorf(path, "unknown mode %q, want FCFK, FCSK, SCFK or SCSK", text)
		e.kinds = append(e.kinds, ErrUnknownMode)
		return e
	}
	return nil
}

func (ep *entryParser) readString(path string) (string, error) {
	var raw json.RawMessage
	if err := ep.dec.Decode(&raw); err != nil {
		return "", ep.syntaxError(ep.index, ep.dec, err)
	}
	if raw[0] != '"' {
		return "", ep.errorf(path, "want a string, got %s", rawKind(raw))
	}
	// encoding/json would turn an unpaired surrogate into U+FFFD, so the
	// string read would differ from the one in the file.
	if hasUnpairedSurrogate(raw) {
		return "", ep.errorf(path, "string contains an unpaired UTF-16 surrogate escape")
	}
	var text string
	if err := json.Unmarshal(raw, &text); err != nil {
		e := ep.errorf(path, "invalid JSON string: %v", err)
		e.kinds = append(e.kinds, err)
		return "", e
	}
	return text, nil
}

func (ep *entryParser) readInt(path string, dst *int) error {
	return ep.readElement(path, -1, dst)
}

// readElement reads a positive integer, element index of the array at path,
// or the value at path itself when index is -1.
func (ep *entryParser) readElement(path string, index int, dst *int) error {
	token, err := ep.token()
	if err != nil {
		return err
	}
	number, ok := token.(json.Number)
	problem := ""
	if ok {
		*dst, problem = parseDim(string(number))
	} else {
		problem = "want a positive integer, got " + tokenKind(token)
	}
	if problem == "" {
		return nil
	}
	if index >= 0 {
		// The element path is built only on error, which keeps an allocation
		// per integer out of the common path.
		path = fmt.Sprintf("%s[%d]", path, index)
	}
	return ep.errorf(path, "%s", problem)
}

// readInts reads a JSON array of exactly len(dst) positive integers.
func (ep *entryParser) readInts(path string, dst []int) error {
	token, err := ep.token()
	if err != nil {
		return err
	}
	if token != json.Delim('[') {
		return ep.errorf(path, "want %d integers, got %s", len(dst), tokenKind(token))
	}

	count := 0
	for ; ep.dec.More(); count++ {
		if count >= len(dst) {
			// Count the surplus elements for the message without keeping them.
			if err := ep.skipValue(path); err != nil {
				return err
			}
			continue
		}
		if err := ep.readElement(path, count, &dst[count]); err != nil {
			return err
		}
	}
	if _, err := ep.token(); err != nil {
		return err
	}

	if count != len(dst) {
		return ep.errorf(path, "want %d integers, got %d", len(dst), count)
	}
	return nil
}

func (ep *entryParser) skipValue(path string) error {
	depth := 0
	for {
		token, err := ep.token()
		if err != nil {
			return err
		}
		switch token {
		case json.Delim('['), json.Delim('{'):
			depth++
		case json.Delim(']'), json.Delim('}'):
			depth--
		}
		if depth == 0 {
			return nil
		}
	}
}

// parseDim parses a JSON number that must be an integer in 1..maxDim. It
// returns the reason when the number is not one.
func parseDim(text string) (int, string) {
	if strings.ContainsAny(text, ".eE") || strings.HasPrefix(text, "-") {
		return 0, fmt.Sprintf("want a positive integer, got %s", text)
	}
	value, err := strconv.ParseInt(text, 10, 64)
	if err != nil || value > maxDim {
		return 0, fmt.Sprintf("%s is above the maximum %d", text, maxDim)
	}
	if value < 1 {
		return 0, fmt.Sprintf("want a positive integer, got %s", text)
	}
	return int(value), ""
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func containsString(list []string, s string) bool {
	for _, item := range list {
		if item == s {
			return true
		}
	}
	return false
}

// tokenKind names the JSON type that a decoder token starts.
func tokenKind(token json.Token) string {
	switch token := token.(type) {
	case json.Delim:
		if token == '{' {
			return "an object"
		}
		return "an array"
	case string:
		return "a string"
	case json.Number, float64:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return fmt.Sprintf("%T", token)
}

// rawKind names the JSON type of a valid JSON value.
func rawKind(raw []byte) string {
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// hasUnpairedSurrogate reports whether a valid JSON string literal contains a
// \u escape of a UTF-16 surrogate that is not part of a high-low pair.
func hasUnpairedSurrogate(literal []byte) bool {
	for i := 0; i < len(literal); i++ {
		if literal[i] != '\\' {
			continue
		}
		i++
		if literal[i] != 'u' {
			continue
		}
		unit := hexValue(literal[i+1 : i+5])
		i += 4
		switch {
		case unit >= 0xDC00 && unit < 0xE000:
			return true
		case unit >= 0xD800 && unit < 0xDC00:
			rest := literal[i+1:]
			if len(rest) < 6 || rest[0] != '\\' || rest[1] != 'u' {
				return true
			}
			low := hexValue(rest[2:6])
			if low < 0xDC00 || low >= 0xE000 {
				return true
			}
			i += 6
		}
	}
	return false
}

func hexValue(digits []byte) int {
	value, _ := strconv.ParseUint(string(digits), 16, 32)
	return int(value)
}

// Marshal encodes the information in AMCT's layout, byte for byte what
// Python's json.dump(entries, f, indent='\t') writes: tab indentation, one
// list element per line, ": " after keys, keys in AMCT's order, non-ASCII
// characters as \u escapes, and no newline at the end. Marshal does not
// validate the entries, but Check and WriteFile do.
func (info *Info) Marshal() []byte {
	if info == nil || len(info.Entries) == 0 {
		return []byte("[]")
	}
	var b bytes.Buffer
	b.Grow(450 * len(info.Entries))
	b.WriteString("[\n")
	for i, entry := range info.Entries {
		if i > 0 {
			b.WriteString(",\n")
		}
		writeEntry(&b, entry)
	}
	b.WriteString("\n]")
	return b.Bytes()
}

func writeEntry(b *bytes.Buffer, e Entry) {
	b.WriteString("\t{\n\t\t\"ori_layer_info\": {\n\t\t\t\"name\": ")
	writePythonString(b, e.Layer.Name)
	b.WriteString(",\n\t\t\t\"in_channels\": ")
	b.WriteString(strconv.Itoa(e.Layer.InChannels))
	b.WriteString(",\n\t\t\t\"out_channels\": ")
	b.WriteString(strconv.Itoa(e.Layer.OutChannels))
	b.WriteString(",\n\t\t\t\"kernel_size\": ")
	writeIntList(b, e.Layer.KernelSize[:], 3)
	b.WriteString(",\n\t\t\t\"stride\": ")
	writeIntList(b, e.Layer.Stride[:], 3)
	b.WriteString(",\n\t\t\t\"dilation\": ")
	writeIntList(b, e.Layer.Dilation[:], 3)
	b.WriteString(",\n\t\t\t\"groups\": ")
	b.WriteString(strconv.Itoa(e.Layer.Groups))
	b.WriteString("\n\t\t},\n\t\t\"mode\": ")
	writePythonString(b, string(e.Mode))
	b.WriteString(",\n\t\t\"decom_nodes\": {\n\t\t\t\"first\": {\n\t\t\t\t\"weight_shape\": ")
	writeIntList(b, e.FirstShape[:], 4)
	b.WriteString("\n\t\t\t},\n\t\t\t\"last\": {\n\t\t\t\t\"weight_shape\": ")
	writeIntList(b, e.LastShape[:], 4)
	b.WriteString("\n\t\t\t}\n\t\t}\n\t}")
}

// writeIntList writes a list that opens on a line indented by depth tabs.
func writeIntList(b *bytes.Buffer, values []int, depth int) {
	b.WriteString("[\n")
	for i, value := range values {
		if i > 0 {
			b.WriteString(",\n")
		}
		b.WriteString(strings.Repeat("\t", depth+1))
		b.WriteString(strconv.Itoa(value))
	}
	b.WriteString("\n")
	b.WriteString(strings.Repeat("\t", depth))
	b.WriteString("]")
}

// writePythonString writes s quoted as Python's json module does with
// ensure_ascii=True: only printable ASCII stays literal, and \", \\, \b, \f,
// \n, \r, \t have short escapes. Everything else becomes lowercase \uXXXX
// escapes, in UTF-16 surrogate pairs above U+FFFF.
func writePythonString(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			switch {
			case r >= 0x20 && r <= 0x7e:
				b.WriteByte(byte(r))
			case r > 0xffff:
				high, low := utf16.EncodeRune(r)
				writeUnicodeEscape(b, high)
				writeUnicodeEscape(b, low)
			default:
				writeUnicodeEscape(b, r)
			}
		}
	}
	b.WriteByte('"')
}

func writeUnicodeEscape(b *bytes.Buffer, unit rune) {
	const digits = "0123456789abcdef"
	b.WriteString(`\u`)
	for shift := 12; shift >= 0; shift -= 4 {
		b.WriteByte(digits[(unit>>shift)&0xf])
	}
}

// WriteFile writes the information to path in AMCT's layout (see Marshal)
// and replaces the file atomically: the data goes to a temporary file in the
// same folder, which is synced and then renamed over path. A symbolic link at
// path is followed. A new file gets mode 0644 and an existing one keeps its mode.
//
// WriteFile rejects information that ParseInfo would reject when reading the
// file back, with an error that wraps ErrInvalidInfo. It does not call Check,
// so it writes inconsistent shapes as AMCT would.
func (info *Info) WriteFile(path string) error {
	data := info.Marshal()
	if _, err := ParseInfo(data, ""); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}

	target := path
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		target = resolved
	}
	perm := fs.FileMode(0o644)
	if existing, err := os.Stat(target); err == nil && existing.Mode().IsRegular() {
		perm = existing.Mode().Perm()
	}

	if err := writeFileAtomic(target, data, perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func writeFileAtomic(path string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	renamed := false
	defer func() {
		if !renamed {
			tmp.Close()
			os.Remove(tmpName)
		}
	}()

	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmpName, path); err != nil {
		return err
	}
	renamed = true

	// Syncing the folder makes the rename itself durable. Some file systems
	// do not support syncing a folder, and the data is already in place, so
	// errors here are ignored.
	if folder, err := os.Open(dir); err == nil {
		folder.Sync()
		folder.Close()
	}
	return nil
}
